"""imagemill's pipelines: wiring only (no model calls, no image decoding).

`curate.py` (`beam run curate`: the graph and its runner), `select.py` (`beam run
select`), `scoring.py` (the model stages, and the model checks run before a graph is
built), `outputs.py` (index, rejects, report), `funnel.py` (the funnel a run prints),
`report.py` (the report's samples, drawn in the pipeline) and `report_html.py`
(`report.html` and `beam report`), `progress.py` (live progress),
`runner.py` (Beam runner options), `cli.py` (the `beam` command), `demo.py` (`make
demo`); `testing/` holds the demo and test aids."""
