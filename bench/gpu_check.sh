#!/usr/bin/env bash
# The checks that need a GPU, as one command for a device machine: real NVML, the worker training
# on CUDA (the end-to-end tests and QLoRA's), padding-free packing against padding with sdpa and
# flash_attention_2 where flash-attn imports, and the packed losses against each example alone
# (bench/gpu_packing.py), full fine-tune against LoRA, LoRA with gradient checkpointing and QLoRA on a
# 0.5B model (bench/gpu_adapters.py), a 1.1B full fine-tune that does not fit the GPU as a replica trained
# with fsdp + cpu_offload (bench/gpu_sharding.py), and the supervisor overhead on the GPU. About 10 minutes; no step
# runs past BUDGET seconds from the start (default 570).
#
# On the development machine, in the repository root (once per session):
#   echo /.whl/ >> .git/info/exclude
#   bench/gpu_check.sh --fetch          # the wheels the GPU image lacks, pinned as in constraints.txt
# On the device machine (the `run` tool with carry [".whl"]):
#   bench/gpu_check.sh                  # writes $OUT/gpu_check.log, nvml.json, pytest.txt, qlora.txt,
#                                       #   packing.json, packing.md, adapters-0.5b.json, sharding.json,
#                                       #   overhead.json
#   ADAPTER_SIZES="0.5b 1.5b" bench/gpu_check.sh   # the adapter benchmark at 1.5B too (about 3 minutes more)
# Here, to try the script itself on the CPU:
#   PYTHON=.venv/bin/python OUT=/tmp/gpu-check bench/gpu_check.sh --no-wheels
set -uo pipefail
cd "$(dirname "$0")/.."

# The GPU image has torch, transformers, accelerate, psutil, nvidia-ml-py; the rest (43 MiB, bitsandbytes
# nearly all of it) travels in .whl. peft is a py3-none-any wheel, bitsandbytes py3-none-manylinux_2_24.
WHEELS=(orjson watchfiles blake3 peft bitsandbytes)
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
BUDGET=${BUDGET:-570}
ADAPTER_SIZES=${ADAPTER_SIZES:-0.5b}

pin() { grep -i "^$1==" constraints.txt; }

if [[ ${1:-} == --fetch ]]; then
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 \
            -d .whl "$(pin "$name")" || exit 1
    done
    ls -l .whl
    exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if [[ ${1:-} != --no-wheels ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
# A step's time limit: its own, or what is left of BUDGET if that is less (10 s at the least).
limit() { local left=$((BUDGET - SECONDS)); echo $(( left < $1 ? (left > 10 ? left : 10) : $1 )); }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || echo "no nvidia-smi"
"$PY" - <<'EOF'
import sys, torch, transformers, accelerate
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, cuda available: {torch.cuda.is_available()}")
EOF

step "NVML as the daemon samples it (engine/core/gpu.py)"
"$PY" - "$OUT/nvml.json" <<'EOF'
import json, os, sys
from engine.core.gpu import GpuMonitor
with GpuMonitor() as monitor:
    sample = monitor.sample([os.getpid()], force=True)
    sample["preflight_1GiB"] = monitor.preflight(1 << 30)
    sample["preflight_1PiB"] = monitor.preflight(1 << 50)
json.dump(sample, open(sys.argv[1], "w"), indent=1)
print(json.dumps(sample, indent=1))
EOF

step "the worker on CUDA: end-to-end tests (real tiny model)"
# Two ranks need two GPUs: those tests run where there are.
two=$("$PY" -c "import torch; print(torch.cuda.device_count() >= 2)")
[[ $two == True ]] && select="" || select="not two-processes and not two_training_processes"
timeout "$(limit 400)" "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m e2e --timeout 240 -k "$select" \
    tests/test_worker.py tests/test_end_to_end.py tests/test_end_to_end_control.py tests/test_guard.py \
    tests/test_worker_control.py 2>&1 | tee "$OUT/pytest.txt" | tail -40

step "QLoRA end to end: a 4-bit base, the adapter trained, checkpointed and saved alone"
timeout "$(limit 150)" "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs --timeout 120 tests/test_qlora_gpu.py \
    2>&1 | tee "$OUT/qlora.txt" | tail -15

# Without CUDA (trying the script on a CPU) the benchmarks run their tiny --smoke shapes instead.
[[ $("$PY" -c "import torch; print(torch.cuda.is_available())") == True ]] && smoke="" || smoke="--smoke"

step "packing against padding${smoke:+ (smoke)}: sdpa, flash_attention_2 where it imports (bench/gpu_packing.py)"
# packing.md is the summary to paste into docs/performance.md; packing.json has every figure.
timeout "$(limit 150)" "$PY" bench/gpu_packing.py $smoke --out "$OUT/packing.json" --markdown "$OUT/packing.md"

for size in $ADAPTER_SIZES; do
    step "adapters at $size${smoke:+ (smoke)}: full, lora, lora + gradient checkpointing, qlora (bench/gpu_adapters.py)"
    timeout "$(limit 240)" "$PY" bench/gpu_adapters.py --size "$size" $smoke --event-timeout 120 \
        --out "$OUT/adapters-$size.json"
done

step "a model too big for a replica: fsdp + cpu_offload on one GPU, its peak against the estimate${smoke:+ (smoke)} (bench/gpu_sharding.py)"
timeout "$(limit 240)" "$PY" bench/gpu_sharding.py $smoke --out "$OUT/sharding.json"

step "supervisor overhead on this machine"
timeout "$(limit 150)" "$PY" bench/supervisor_overhead.py --repeats 2 --examples 6000 --packing --json > "$OUT/overhead.json"
cat "$OUT/overhead.json"

step "done"
