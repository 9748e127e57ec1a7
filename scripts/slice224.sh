#!/usr/bin/env bash
# 224 px on a slice (first 2,000 training / 200 test records, one epoch per
# stage), once from the activation cache and once with --no-cache, recording
# wall time and peak anonymous resident memory (RssAnon, sampled every 2 s;
# pages of the memory-mapped cache are file-backed and not counted there).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
CACHE=${CACHE:-data/cache}
run() {
  local name=$1; shift
  /usr/bin/time -v ./target/release/vgg16 train --data "$DATA" --image-size 224 --limit-train 2000 --limit-test 200 \
      --stage1-epochs 1 --stage2-epochs 1 --cache-dir "$CACHE" --out runs/$name "$@" > runs/$name.log 2>&1 &
  local pid=$!
  local peak=0
  while kill -0 $pid 2>/dev/null; do
    for p in $(pgrep -P $pid); do
      a=$(awk '/RssAnon/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)
      [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a
    done
    sleep 2
  done
  echo "peak RssAnon: $peak kB" >> runs/$name.log
}
run slice224-cached
run slice224-nocache --no-cache
