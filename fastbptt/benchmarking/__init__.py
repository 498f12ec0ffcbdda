"""Benchmarks: ``profile`` (``python -m fastbptt profile``), ``benchmark`` (``python -m fastbptt bench``),
``compare`` (the same step in PyTorch and JAX), ``timing`` (best-of-N wall time), and the
machine's load and BLAS kernels (``_load``, ``_loadbench``, ``_machine``).
"""
