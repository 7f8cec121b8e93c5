#!/usr/bin/env bash
# The GPU benchmark behind benchmarks/results/*-cuda*.md: one call on a lent GPU machine
# with torch and JAX installed, higher/TorchOpt carried as wheels in .whl/ (see README).
# Writes logs and results under $OUT (default: benchmarks/results/gpu).
# --in-process: on the lent H100 (2026-11-26) each measurement's own process took so long
# to start (torch with CUDA, JAX) that one workload and N did not finish in 100 s.
set -u
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, jax; print('torch', torch.__version__, torch.cuda.get_device_name(), 'jax', jax.__version__, jax.devices())"
timeout 100 python3 -m pytest -q -p no:cacheprovider -W default tests/test_cuda.py 2>&1 \
  | tee "$out/test_cuda.log" | tail -8
timeout 260 python3 -m benchmarks.run --in-process --device cuda --workloads sinusoid --steps 5 10 \
  --impls "torch_maml FiniteSum" "torch_maml FiniteSum compiled" "torch_maml FiniteSum CUDA graphs" \
  "torch_maml Exact" "torch.func loop" higher TorchOpt JAX --timeout 100 --out "$out/sinusoid"
timeout 130 python3 -m benchmarks.run --in-process --device cuda --workloads conv4 --steps 5 \
  --impls "torch_maml FiniteSum" "torch_maml FiniteSum compiled" "torch_maml Exact" \
  "torch.func loop" higher TorchOpt JAX --timeout 100 --out "$out/conv4"
timeout 60 python3 -m benchmarks.run --in-process --device cuda --workloads conv4 --steps 1 20 --repeats 3 \
  --impls "torch_maml FiniteSum" "torch_maml FiniteSum all vmapped" "torch_maml Exact" TorchOpt \
  --timeout 30 --out "$out/memory"
