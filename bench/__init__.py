"""Benchmarks of fused_mbconv: the model sweep (``python -m bench``), per-op scripts
(``bench/bench_*.py``), the pytest-benchmark suite (``pytest bench``), shared timing helpers."""
