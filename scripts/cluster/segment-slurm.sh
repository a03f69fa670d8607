#!/usr/bin/env bash
# Segments a shared archive with a Slurm array: each task takes one shard of the cases (by a hash
# of the case name, so no coordinator), skips cases already done, and writes its own
# batch_summary_shard-I-of-N.json. Submit from the medseg checkout:
#   sbatch --array=0-15 scripts/cluster/segment-slurm.sh RUN_DIR ARCHIVE_DIR OUTPUT_DIR
# Rerunning the same array resumes (--skip-existing); a task's failed cases are in its summary.
# One summary for the whole batch, once every task has ended (it lists shards that did not finish):
#   sbatch --dependency=afterany:ARRAY_JOB_ID --wrap \
#       "target/release/medseg segment --merge-summaries OUTPUT_DIR"
#SBATCH --job-name=medseg-segment
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
set -euo pipefail
run="$1" archive="$2" output="$3"
# --shard auto reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT.
exec target/release/medseg segment --model "$run" "$archive" --output "$output" \
    --skip-existing --shard auto
