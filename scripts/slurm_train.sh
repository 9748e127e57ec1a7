#!/bin/bash
# Slurm: stages 1 and 2 data-parallel over MPI, after scripts/slurm_cache.sh
# (a cache missing a shard is finished by the ranks themselves, in shards).
# Needs vgg16 built with `cargo build --release --features mpi`. Submit with:
#   sbatch --dependency=afterok:<cache job> --nodes=16 --ntasks-per-node=1 scripts/slurm_train.sh
#SBATCH --job-name=vgg16-train
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
set -euo pipefail
CACHE=${CACHE:-/shared/vgg16/cache}
DATA=${DATA:-/shared/vgg16/data}
SIZE=${SIZE:-224}
RUN=${RUN:-/shared/vgg16/runs/$SLURM_JOB_ID}
# srun starts one rank per task (PMI); `mpirun vgg16 ...` works the same.
# A failed job continues with: ... vgg16 train --data "$DATA" --cache-dir "$CACHE" --resume "$RUN"
srun vgg16 train --data "$DATA" --image-size "$SIZE" --recipe tuned \
  --cache-dir "$CACHE" --out "$RUN" --threads "${SLURM_CPUS_PER_TASK:-2}"
