#!/usr/bin/env bash
# CIFAR-10 records -> an image folder of JPEGs at random sizes (48-160 px),
# then training on both at 32 px, for the "folder within noise of archive"
# comparison (BENCHMARKS.md section 9).
#   scripts/cifar_to_folder.sh DATA OUT TRAIN_N TEST_N
set -euo pipefail
data=${1:-data}; out=${2:-/tmp/cifar-folder}; ntr=${3:-5000}; nte=${4:-1000}
cargo run --release --example cifar_to_folder -- "$data" "$out" "$ntr" "$nte"
