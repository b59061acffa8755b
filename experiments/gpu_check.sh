#!/usr/bin/env bash
# GPU checks in one go, for a machine with one CUDA GPU and PyTorch already installed:
#   1. ssod-bench at the paper's setting (ResNet-50 FPN, ~1333x800, 1 labeled + 3 unlabeled,
#      bf16), with and without channels_last, and in float32 (TF32);
#   2. the tests that run on CUDA when it is there (tests/test_performance.py, tests/test_step.py,
#      tests/models/test_rcnn.py).
# Usage, from the repository root:  bash experiments/gpu_check.sh [OUT_DIR]
# PROFILE=3 adds a torch.profiler table of 3 polish_teacher steps to each bench; ONLY_FIRST=1
# stops after the first bench and the tests; BENCH_TIMEOUT / TEST_TIMEOUT bound each part.
# Missing Python packages may be given as wheels in .whl/ (installed to /tmp/site).
# The ImageNet file is replaced by random weights of the same layout (timing only), so the
# model is the paper's: frozen BatchNorm and stem, three trainable stages.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/ssod-gpu}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export SSOD_CACHE_DIR=/tmp/ssod-cache TORCH_HOME=/tmp/ssod-torch-home
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import os, torch, torchvision
from torchvision.models import ResNet50_Weights
print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())
path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url))
os.makedirs(os.path.dirname(path), exist_ok=True)
# Stand-in weights, timing only: random, with BatchNorm statistics gathered on random images
# so that the frozen BatchNorm keeps activations in range (raw init overflows bf16 in 50 layers).
net = torchvision.models.resnet50().cuda().train()
for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = None  # cumulative average
with torch.no_grad():
    for _ in range(8):
        net(torch.randn(16, 3, 224, 224, device="cuda"))
torch.save({k: v.cpu() for k, v in net.state_dict().items()}, path)
print("stand-in ImageNet weights at", path)
EOF

PAPER=(experiment=coco_partial data=synthetic "data.synthetic.image_size=[800,1333]"
       "data.synthetic.object_size=[24,400]" data.synthetic.num_train=30 data.synthetic.num_val=256
       "data.train_min_sizes=[800,800]" data.train_max_size=1333 data.test_size=800 data.num_workers=8)
bench() {  # bench NAME PRECISION OVERRIDES...
    local name=$1 precision=$2
    shift 2
    echo "## $name" | tee -a "$OUT/bench.md"
    timeout "${BENCH_TIMEOUT:-150}" python3 -m ssod.bench --device cuda --precision "$precision" --no-mlflow \
        --repeats 5 --warmup 2 --eval-images 256 ${PROFILE:+--profile "$PROFILE"} \
        --overrides "${PAPER[@]}" "$@" 2>"$OUT/bench-$name.err" | tee -a "$OUT/bench.md"
    echo | tee -a "$OUT/bench.md"
}
bench bf16 bf16
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_performance.py tests/test_step.py tests/models/test_rcnn.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
[ -n "${ONLY_FIRST:-}" ] && exit 0
bench bf16-channels-last bf16 train.channels_last=true
bench fp32-tf32 fp32
cat "$OUT/tests.txt"
