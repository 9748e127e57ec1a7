#!/usr/bin/env bash
# Two builds of `vgg16` alternated on `vgg16 extract --layers gap`, for a
# change's before/after on a noisy machine (only alternation in one run is
# fair). Prints each round's rate after the first batch (kernels packed,
# fresh pages touched; the whole run's rate when there is one batch), then
# the median ratio second / first and the rounds the second won.
# VGG16_ISA / VGG16_CONV in the environment apply to both.
#
# Usage: scripts/ab_extract.sh FIRST_VGG16 SECOND_VGG16 SIZE BATCH IMAGES [ROUNDS]
# DATA defaults to data/ (the CIFAR-10 archive there).
set -euo pipefail
[ $# -ge 5 ] || { sed -n 2,9p "$0"; exit 2; }
A=$1 B=$2 S=$3 BS=$4 N=$5 R=${6:-6}
DATA=${DATA:-data/}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rate() {
  "$1" extract --data "$DATA" --image-size "$S" --batch-size "$BS" --limit "$N" --layers gap \
    --out "$out/x.npz" --threads 2 2>&1 | grep '^done: ' |
    sed -n -e 's/.*; \([0-9.]*\) img\/s after the first batch.*/\1/p' -e 't' \
      -e 's/^done: .*(\([0-9.]*\) img\/s.*/\1/p'
}
ratios=()
for r in $(seq "$R"); do
  if [ $((r % 2)) = 1 ]; then x=$(rate "$A"); y=$(rate "$B"); else y=$(rate "$B"); x=$(rate "$A"); fi
  echo "round $r: first $x img/s, second $y img/s"
  ratios+=("$(python3 -c "print($y / $x)")")
done
python3 - "${ratios[@]}" <<'PY'
import statistics, sys
r = [float(v) for v in sys.argv[1:]]
print(f"median ratio second / first {statistics.median(r):.3f}; second ahead in {sum(v > 1 for v in r)} of {len(r)}")
PY
