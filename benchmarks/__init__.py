"""Side-by-side benchmarks of torch_maml against other MAML implementations.

Run ``python -m benchmarks.run --help``. Needs the ``benchmark`` extra
(``pip install ".[benchmark]"``): parallel-metalearn, higher, TorchOpt and,
optionally, JAX. ``python -m benchmarks.structure`` reports how the package's code
is laid out against an earlier revision; ``python -m benchmarks.smoothness`` times
``estimate_smoothness``.
"""
