#!/usr/bin/env bash
# GRPO post-training on Slurm: one launcher per node, one rank per GPU.
#
#   sbatch slurm/grpo.sh CONFIG.yaml [section.key=value ...]
#
# Submit from the checkout. sbatch options on the command line override the defaults below.
# Preemption works as for slurm/pretrain.sh: SIGUSR1 10 minutes before the time limit (or
# SIGTERM), a checkpoint, exit 75, requeue, resume (checkpoint.resume=auto, the default).
# docs/launch.md and docs/grpo.md have the details.
#SBATCH --job-name=megads-grpo
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
megads_require_module megads.grpo
megads_require_config "$@"
megads_launch grpo "$@"
