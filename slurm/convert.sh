#!/usr/bin/env bash
# Convert a checkpoint on Slurm (one process on one CPU node): tools/convert_checkpoint.py with
# the arguments given here.
#
#   sbatch slurm/convert.sh [tools/convert_checkpoint.py arguments ...]
#
# Submit from the checkout. sbatch options on the command line override the defaults below.
# A conversion is not resumable, so no warning signal is asked for (it would only stop the
# conversion early); --requeue reruns it from the start after a node failure or preemption.
#SBATCH --job-name=megads-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MEGADS_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"

megads_enter_checkout
megads_require_file tools/convert_checkpoint.py
srun --nodes=1 --ntasks=1 "$MEGADS_PYTHON" tools/convert_checkpoint.py "$@"
