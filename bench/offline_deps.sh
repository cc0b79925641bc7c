#!/usr/bin/env bash
# Pack what bench/device_check.sh needs beyond a CUDA PyTorch image (lightly, Kornia, OpenCV
# with its contrib modules, Hydra/OmegaConf) for a GPU machine that cannot reach a package
# index: the packages' files for one Python version on manylinux x86-64, in one .tar.xz
# (about 39 MB, under half the wheels' size: the OpenCV wheel alone is 56 MB).
#
#   bash bench/offline_deps.sh [OUT] [PYVER]     # default .deps/site.tar.xz, Python 3.12
#
# On the machine, from the repository root (torch, torchvision, timm, pytorch_lightning, numpy
# and Pillow come from its image):
#
#   mkdir -p /tmp/site && tar -C /tmp/site -xJf .deps/site.tar.xz && export PYTHONPATH=/tmp/site
#   OBJCROP_BING_MODEL=<the BING model folder> bash bench/device_check.sh
#
# (the check puts the checkout itself on PYTHONPATH: the package need not be installed)
#
# The packages are unpacked, not installed: pure and abi3 wheels need nothing more (no
# scripts, no .data folders). OpenCV's Haar cascades (cv2/data) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.deps/site.tar.xz}
PYVER=${2:-3.12}
TAG=cp${PYVER/./}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
get() {
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$WORK/wheels" "$@"
}
# OpenCV 4.10: the newest contrib build under 60 MB (5.x is 69 MB); abi3, any Python >= 3.7
get lightly==1.6.0 hydra-core==1.3.8 omegaconf==2.3.0 kornia==0.9.0 kornia_rs==0.2.0 \
  opencv-contrib-python-headless==4.10.0.84
# antlr4-python3-runtime 4.9.3 (what OmegaConf 2.3 needs) exists only as a source archive
python3 -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/wheels" \
  antlr4-python3-runtime==4.9.3
mkdir -p "$WORK/site"
for w in "$WORK"/wheels/*.whl; do
  case "$w" in
    *-cp3*-cp3*) [[ "$w" == *-"$TAG"-* ]] || { echo "wrong Python tag: $w" >&2; exit 1; } ;;
  esac
  python3 -m zipfile -e "$w" "$WORK/site"
done
rm -rf "$WORK"/site/cv2/data/*.xml
mkdir -p "$(dirname "$OUT")"
tar -C "$WORK/site" -cf - . | xz -9 -T0 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
ls -l "$OUT"
echo "packed: $(ls "$WORK/wheels" | tr '\n' ' ')"
