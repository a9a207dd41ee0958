"""imagemill's pipelines: wiring only (no model calls, no image decoding).

`curate.py` (`beam run curate`: the graph and its runner), `select.py` (`beam run
select`), `scoring.py` (the model stages, and the model checks run before a graph is
built), `outputs.py` (index, rejects, report), `funnel.py` (the funnel a run prints),
`runner.py` (Beam runner options), `cli.py` (the `beam` command), `demo.py` (`make
demo`); `testing/` holds the demo and test aids."""
