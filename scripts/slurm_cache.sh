#!/bin/bash
# Slurm job array: task i of n builds shard i/n of the caches `vgg16 train`
# needs (train, test, and the mirrored view of the tuned recipe) into a
# --cache-dir on a filesystem every node sees. The last shard to finish
# seals each cache. Submit with: sbatch --array=0-15 scripts/slurm_cache.sh
#SBATCH --job-name=vgg16-cache
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
set -euo pipefail
CACHE=${CACHE:-/shared/vgg16/cache}
DATA=${DATA:-/shared/vgg16/data}
SIZE=${SIZE:-224}
n=${SLURM_ARRAY_TASK_COUNT:?run as a job array: sbatch --array=0-15 $0}
i=${SLURM_ARRAY_TASK_ID:?}
# Task ids must run 0..n-1 (--array=0-15, not 1-16).
vgg16 cache build --data "$DATA" --image-size "$SIZE" --flip true \
  --shard "$i/$n" --cache-dir "$CACHE" --threads "${SLURM_CPUS_PER_TASK:-2}"
