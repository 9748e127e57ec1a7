#!/usr/bin/env bash
# Folder input at 224 px (BENCHMARKS.md 9.2): the input pipeline alone
# (read, decode, resize, preprocess) against the cache build on the same
# files, and the cache build's peak memory with a 50,000-image listing.
#   scripts/folder224.sh SMALL_JPEG_FOLDER PHOTO_SIZED_FOLDER [N]
# (make them with examples/cifar_to_folder.rs: sizes 48-160 and 375-500)
set -euo pipefail
small=${1:?folder of small JPEGs}; big=${2:?folder of photo-sized JPEGs}; n=${3:-256}
bin=./target/release/vgg16
lscpu | grep -m1 'Model name'
for d in "$small" "$big" data; do
  $bin bench input --data "$d" --image-size 224 --limit 512 --batch 16
done
for d in "$small" "$big"; do
  tmp=$(mktemp -d)
  /usr/bin/time -v $bin train --data "$d" --image-size 224 --limit-train "$n" --limit-test 32 \
      --stage1-epochs 1 --stage2-epochs 1 --cache-dir "$tmp/cache" --out "$tmp/run" 2>&1 |
    grep -E 'cache: building .*train|cache: .*/'"$n"' img \(100|Maximum resident|Elapsed' || true
  python3 -c "import json,sys; m=json.load(open('$tmp/run/metrics.json')); print('cache_seconds', m['cache_seconds'])"
  rm -rf "$tmp"
done
