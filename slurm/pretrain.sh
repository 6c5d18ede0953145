#!/usr/bin/env bash
# Pretrain megads on Slurm: one launcher per node, one rank per GPU.
#
#   sbatch slurm/pretrain.sh CONFIG.yaml [section.key=value ...]
#   sbatch --nodes=8 --time=2-00:00:00 slurm/pretrain.sh configs/v3-16b.yaml train.steps=20000
#
# Submit from the checkout. sbatch options on the command line override the defaults below.
# 10 minutes before the time limit Slurm sends SIGUSR1: the ranks finish their step, save a
# checkpoint and exit 75, and this script requeues the job, which resumes from that checkpoint.
# The same happens on SIGTERM to the job steps (scancel --signal=TERM, a preemption with a grace
# time). docs/launch.md has the details.
#SBATCH --job-name=megads-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --requeue
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MEGADS_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"

megads_enter_checkout
megads_require_module megads.pretrain
megads_require_config "$@"
megads_launch pretrain "$@"
