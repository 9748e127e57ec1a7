#!/usr/bin/env bash
# Side-by-side whole-base throughput: `vgg16 extract` and ONNX Runtime on the
# same VGG-16 base, alternated ROUNDS times so machine drift hits both.
# Usage: scripts/extract_vs_ort.sh SIZE BATCH IMAGES [ROUNDS]
# CONVS="auto direct im2col" (default "auto") runs `vgg16 extract` once per
# round with each VGG16_CONV value, so the algorithms are compared in the
# same rounds too. Each of ours is shown whole (first batch included) and
# after the first batch, as the peer's rate leaves out its warm-up.
# Needs: target/release/vgg16, weights/vgg16_imagenet_notop.npz, the full
# CIFAR-10 archive (DATA, default data/), python3 with onnxruntime, onnx,
# numpy, and ../shared/peers/ort_vgg16_bench.py (PEER to override).
set -euo pipefail
S=${1:?size}; B=${2:?batch}; N=${3:?images}; ROUNDS=${4:-3}
DATA=${DATA:-data/}
PEER=${PEER:-../shared/peers/ort_vgg16_bench.py}
CONVS=${CONVS:-auto}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$ROUNDS"); do
  line="round $r: size $S batch $B:"
  rates=()
  for c in $CONVS; do
    done_line=$(VGG16_CONV=$c ./target/release/vgg16 extract --data "$DATA" --image-size "$S" --batch-size "$B" \
      --limit "$N" --layers gap --out "$out/x.npz" --threads 2 2>&1 | grep '^done: ')
    ours=$(echo "$done_line" | sed -n 's/^done: .*(\([0-9.]*\) img\/s.*/\1/p')
    # The rate after the first batch (kernels packed, fresh pages): the
    # peer's script likewise leaves out session creation and two warm-up runs.
    steady=$(echo "$done_line" | sed -n 's/.*; \([0-9.]*\) img\/s after the first batch.*/\1/p')
    rates+=("$c=$ours=${steady:-$ours}")
  done
  ort=$(python3 "$PEER" --size "$S" --batch "$B" --threads 2 --seconds 5 |
    python3 -c "import json,sys; print(round(json.loads(sys.stdin.read())['images_per_second'], 2))")
  for cr in "${rates[@]}"; do
    IFS== read -r c ours steady <<< "$cr"
    line="$line vgg16[$c] $ours img/s (ratio $(python3 -c "print(round($ours / $ort, 3))");"
    line="$line after the first batch $steady img/s, ratio $(python3 -c "print(round($steady / $ort, 3))")),"
  done
  echo "$line onnxruntime $ort img/s"
done
