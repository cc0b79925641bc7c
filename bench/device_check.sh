#!/usr/bin/env bash
# The prepared device check: one script for a lent GPU machine (one H100/H200), under 8 minutes (269 s on an H200).
#
#   bash bench/device_check.sh            # OUT=/tmp/objcrop-device-check by default
#
# Runs this checkout's package (on PYTHONPATH; installing it is not needed) and needs its
# dependencies: lightly, Lightning, Kornia, OpenCV (checked first, in seconds); on a
# machine without a package index, see bench/offline_deps.sh.
#
# Parts, each ending in one RESULT line:
#   1. the tests that need CUDA (the GPU engine on the device against the CPU, BING on CUDA)
#   2. bench/gpu_views.py at batch 256: the GPU view engine against its peers, its parts (and
#      the photometric stage under torch.compile), and its time as a
#      fraction of a ResNet-50 step (bf16, channels-last)
#   3. the torch BING generator on the GPU and on the CPU (images/s at 512 px)
#   4. `objcrop train`, MoCo-v2 on ResNet-50 at 224 px on generated data, a few hundred steps,
#      with crop.engine gpu and with crop.engine cpu (16 workers): images/s each; and the same
#      DataLoader alone (bench/train_loader.py), which says whether the loader limits training
#   5. bench/online_refresh.py: an online proposal refresh against a training epoch (bf16), per
#      image, with the heat maps' connected components on the GPU and, as the peer, on the host;
#      and the part of the refresh left on the host (the colour segmentation)
# Without CUDA every part shrinks (tiny model, views, batches and step counts) and still runs, so
# the script itself is checked on any machine; its numbers are then CPU numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/objcrop-device-check}
mkdir -p "$OUT"
# this checkout's package, whether it is installed or not, or installed from another checkout
# (device time is scarce: a run must not measure, or fail on, some other copy)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
objcrop() { python3 -m objcrop_plugin.cli "$@"; }
# every module the parts import, before any part runs: one line naming what is missing
if ! python3 - <<'PY'
import importlib, sys
from pathlib import Path
need = ["torch", "torchvision", "timm", "lightly", "pytorch_lightning", "kornia", "cv2", "PIL",
        "numpy", "yaml", "objcrop_plugin.cli"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or an import that fails for another reason
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("device check: cannot import " + "; ".join(missing) + ". Fix: pip install -e '.[dev]' "
          "(on a machine without a package index: bash bench/offline_deps.sh, see its header)",
          file=sys.stderr)
    sys.exit(1)
import objcrop_plugin
here = Path.cwd().resolve()
if Path(objcrop_plugin.__file__).parent.parent.resolve() != here:
    print(f"device check: objcrop_plugin comes from {objcrop_plugin.__file__}, not {here}",
          file=sys.stderr)
    sys.exit(1)
PY
then
  exit 1
fi
CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
echo "device check on: $DEVICE (outputs in $OUT)"
failed=0
started=$(date +%s)

part() { echo; echo "== $1 ($(( $(date +%s) - started )) s)"; }

part "1. CUDA tests"
if [ "$CUDA" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/ 2>&1 | tail -5
  rc=${PIPESTATUS[0]}
else
  python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/ 2>&1 | tail -3
  rc=${PIPESTATUS[0]}
  [ "$rc" = 5 ] && rc=0  # nothing selected on a CPU machine is fine
fi
echo "RESULT part=cuda_tests device=$DEVICE rc=$rc"
[ "$rc" = 0 ] || failed=1

part "2. GPU view engine (bench/gpu_views.py)"
if [ "$CUDA" = 1 ]; then
  python3 bench/gpu_views.py --batch 256 --workers 16 2>&1 | tail -28 || failed=1
else
  python3 bench/gpu_views.py --threads 1 --skip-torchvision 2>&1 | tail -4 || failed=1
fi

part "3. BING on the GPU and the CPU (bench/proposals.py)"
if [ "$CUDA" = 1 ]; then
  python3 bench/proposals.py --methods bing --images 80 --budget 8 2>&1 | tail -4 || failed=1
else
  python3 bench/proposals.py --methods bing --images 8 --budget 2 2>&1 | tail -4 || failed=1
fi

part "4. objcrop train: MoCo-v2, crop.engine gpu vs cpu"
if [ "$CUDA" = 1 ]; then
  N=6000; SIZE=640x480; BACKBONE=resnet50; VIEW=224; BATCH=128; STEPS=300; WORKERS=16
  ACCEL=gpu; PREC=bf16-mixed; CANVAS=448
else
  N=64; SIZE=160x120; BACKBONE=test_efficientnet; VIEW=32; BATCH=16; STEPS=4; WORKERS=2
  ACCEL=cpu; PREC=32-true; CANVAS=64
fi
objcrop demo-data --data-dir "$OUT/data" --n-images "$N" --image-size "$SIZE" --workers "$WORKERS" \
  > /dev/null || failed=1
COMMON=(data.train_path="$OUT/data" data.proposals="$OUT/data/proposals_gt.objcrop" data.labels=null
        data.num_workers=$WORKERS crop.size=$VIEW crop.canvas=$CANVAS trainer.batch_size=$BATCH)
for engine in gpu cpu; do
  run="$OUT/train_$engine"
  rm -rf "$run"
  objcrop train recipes/lightly/demo_mocov2.yaml "${COMMON[@]}" crop.engine=$engine \
    backbone.name=$BACKBONE backbone.channels_last=$([ "$CUDA" = 1 ] && echo true || echo false) \
    trainer.max_steps=$STEPS trainer.epochs=1000 \
    trainer.accelerator=$ACCEL trainer.precision=$PREC trainer.progress_bar=false \
    trainer.resume=never trainer.out_dir="$run" > "$run.log" 2>&1
  rc=$?
  ips=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['images_per_s'])" "$run/results.json" 2>/dev/null || echo nan)
  echo "RESULT part=train engine=$engine device=$DEVICE backbone=$BACKBONE view=$VIEW batch=$BATCH steps=$STEPS images_per_s=$ips rc=$rc"
  [ "$rc" = 0 ] || { failed=1; tail -5 "$run.log"; }
done
# the same loader without a model: does the loader or the step limit the images/s above?
python3 bench/train_loader.py recipes/lightly/demo_mocov2.yaml "${COMMON[@]}" \
  trainer.out_dir="$OUT/loader" --batches $([ "$CUDA" = 1 ] && echo 40 || echo 3) 2>&1 | tail -3 \
  || failed=1

part "5. online proposal refresh against an epoch (bench/online_refresh.py)"
if [ "$CUDA" = 1 ]; then
  python3 bench/online_refresh.py --device cuda --images 64 --batch 64 2>&1 | tail -10 || failed=1
else
  python3 bench/online_refresh.py --device cpu --images 4 --batch 2 --repeat 1 2>&1 | tail -10 \
    || failed=1
fi

echo
echo "device check done in $(( $(date +%s) - started )) s; failed=$failed"
exit $failed
