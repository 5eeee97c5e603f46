#!/usr/bin/env bash
# Run THERE, on a lent GPU machine, in one device call, after benchmarks/gpu_prepare.sh here:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpudata"], timeout_s=580)
#
# Everything issue 17 asks of a GPU, in the order of what matters most, each step under its
# own time limit so that an overrun loses only the later steps; logs and CSVs go to $OUT
# (at most 8 files come back) as they are made:
#   1. the CUDA equivalence tests (tests/test_sim_device*.py: CPU vs CUDA within 1e-4);
#   2. N = 10,000: bare rounds on CPU and CUDA, the whole simulator on the default path, on
#      the device path run on the CPU, and on CUDA (wall per round, peak device memory,
#      largest model difference from the default path);
#   3. N = 100,000: the bare rounds and the simulator on CUDA (2 timed rounds), then the
#      simulator on the default CPU path (1 timed round: about a minute a round; the CPU's
#      bare rounds and device path would add minutes). Not comparable in bits to CUDA's
#      (the 10,000-peer step checks that); comparable in wall per round.
# Files back (8 at most): check.log (what ran, each step's exit status and time), steps.log
# (every step's output), and a CSV + PNG per benchmark step.
# GPU_CHECK_SIZES="60 120" runs steps 2 and 3 at those sizes instead, and GPU_CHECK_DATASET=digits
# on that dataset (a dry run on a CPU; tests/test_gpu_check_script.py runs it so).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! python3 -c "import pydantic, cryptography, tomli_w" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || { echo "error: could not install .whl" | tee "$out/check.log"; exit 2; }
fi
[ -d .gpudata ] && export P2PFL_DATA_DIR="$PWD/.gpudata"
read -r small big <<< "${GPU_CHECK_SIZES:-10000 100000}"
dataset=(--dataset "${GPU_CHECK_DATASET:-mnist}")
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$out/check.log" 2>&1
step() {  # step NAME SECONDS COMMAND...: one step, its output appended to $OUT/steps.log
    local name=$1 limit=$2; shift 2
    local began=$SECONDS
    echo "=== $name: $*" >> "$out/steps.log"
    timeout "$limit" "$@" >> "$out/steps.log" 2>&1
    echo "$name: exit $? after $((SECONDS - began)) s" | tee -a "$out/steps.log" >> "$out/check.log"
}
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_sim_device.py tests/test_sim_device_path.py -rs
step small 120 python3 benchmarks/sim_scale.py --parts device --device-sizes "$small" --device-rounds 3 "${dataset[@]}" \
    --out "$out/device_small.csv"
step big-cuda 120 python3 benchmarks/sim_scale.py --parts device --device-sizes "$big" --device-rounds 2 "${dataset[@]}" \
    --device-variants bare-cuda,sim-cuda --out "$out/device_big_cuda.csv"
step big-cpu 210 python3 benchmarks/sim_scale.py --parts device --device-sizes "$big" --device-rounds 1 "${dataset[@]}" \
    --device-variants sim-cpu --out "$out/device_big_cpu.csv"
cat "$out/check.log"
