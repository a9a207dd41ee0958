"""The plain-Python cores of the curation stages: no module here imports Apache Beam.

Each stage module in `stages/` is a thin Beam adapter (a DoFn or a composite
PTransform) over a core here; the trainer, the LoRA pre-flight and the
benchmarks reuse these cores directly. `tests/test_layers.py` enforces that
importing this package never imports `apache_beam`.
"""
