"""What tests, benchmarks and load tests share: polling (``testing.polling``), HTTP probes (``testing.http``),
a local or two-node Ray Serve (``testing.serve``) and random-weight checkpoints (``testing.checkpoints``).

A package of its own at the top, not under ``tests/``: benchmarks and load tests are no tests, and they should
not import a test tree (with its conftest fixtures) to poll a URL. Its modules import Ray, torch and the service
only inside the functions that need them, so a benchmark on a GPU host without pydantic can still build a
checkpoint, and tests' helpers that run inside Serve replicas stay light.
"""
