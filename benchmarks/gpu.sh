#!/usr/bin/env bash
# The GPU benchmark behind benchmarks/results/*-cuda*.md, in one call on a lent GPU machine
# with torch and JAX installed; higher, TorchOpt and parallel-metalearn are carried as
# wheels in .whl/ (see the README's Development section). An implementation whose package
# is missing is reported as failed and skipped. Logs and results go under $OUT (default
# benchmarks/results/gpu). Each part runs in one process (--in-process: starting a
# process per measurement, with torch's CUDA and JAX, was too slow on these machines).
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
# 1. the CUDA tests: CPU reference, capture == eager bitwise, NaN policies, new shapes...
timeout 120 python3 -m pytest -q -p no:cacheprovider -W default tests/test_cuda.py 2>&1 \
  | tee "$out/test_cuda.log" | tail -12
# 2. capture: cost of the capturing step, replay time, replay == eager bitwise
timeout 90 python3 -m benchmarks.capture --rounds 20 --out "$out/capture.md" 2>&1 \
  | tee "$out/capture.log" | tail -12
# 3. side by side with the peers, one process per workload
timeout 170 python3 -m benchmarks.run --in-process --device cuda --suite peers --steps 5 10 \
  --workloads sinusoid --impls "torch_maml FiniteSum" "torch_maml FiniteSum eager" \
  "torch_maml Exact" "torch_maml Exact eager" "torch_maml FiniteSum compiled" \
  parallel-metalearn higher TorchOpt JAX --repeats 15 --out "$out/sinusoid" 2>&1 \
  | tee "$out/sinusoid.log" | tail -30
timeout 100 python3 -m benchmarks.run --in-process --device cuda --suite peers --workloads conv4 \
  --steps 5 --impls "torch_maml FiniteSum" "torch_maml FiniteSum eager" "torch_maml Exact" \
  "torch_maml Exact eager" parallel-metalearn higher TorchOpt JAX --repeats 7 \
  --out "$out/conv4" 2>&1 | tee "$out/conv4.log" | tail -20
