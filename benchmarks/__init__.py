"""Side-by-side benchmarks of torch_maml against other MAML implementations.

Run ``python -m benchmarks.run --help``. Needs the ``benchmark`` extra
(``pip install ".[benchmark]"``): higher, TorchOpt and, optionally, JAX.
"""
