# shellcheck shell=bash
# Sourced by the megads sbatch scripts. They run from the checkout they were submitted from
# ($MEGADS_HOME, default $SLURM_SUBMIT_DIR), refuse to start when their target does not exist,
# srun one launcher per node, and requeue the job when the run stopped early to be resumed: on
# SIGUSR1 or SIGTERM to the job steps the ranks save and the launcher exits 75. SIGTERM to the
# batch shell itself (scancel, the time limit) is left untrapped, so that scancel still cancels.

MEGADS_HOME="${MEGADS_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
MEGADS_PYTHON="${MEGADS_PYTHON:-python3}"
REQUEUE_EXIT_CODE=75    # megads.train.preemption.REQUEUE_EXIT_CODE: stopped on a signal, checkpoint saved

megads_fail() {
    echo "megads: error: $*" >&2
    exit 2
}

megads_enter_checkout() {
    cd "$MEGADS_HOME" || megads_fail "cannot enter MEGADS_HOME=$MEGADS_HOME; submit from the megads checkout or set MEGADS_HOME"
    [ -f launch/run.py ] || megads_fail "$MEGADS_HOME is not a megads checkout (no launch/run.py); submit from the checkout or set MEGADS_HOME"
}

# megads_require_module megads.grpo: stop unless the module's source is in this checkout (the ranks run
# `python -m` from here, so the checkout's copy is the one that runs, whatever else is installed).
megads_require_module() {
    local path=${1//.//}
    [ -f "$path.py" ] || [ -f "$path/__main__.py" ] \
        || megads_fail "$1 does not exist in $MEGADS_HOME yet, so there is nothing to run; update the checkout"
}

# megads_require_file tools/convert_checkpoint.py: stop unless the file exists in this checkout.
megads_require_file() {
    [ -f "$1" ] || megads_fail "$1 does not exist in $MEGADS_HOME yet, so there is nothing to run; update the checkout"
}

megads_require_config() {
    [ $# -ge 1 ] || megads_fail "missing the config: sbatch $(basename "$0") CONFIG.yaml [section.key=value ...]"
    [ -f "$1" ] || megads_fail "config $1 not found in $MEGADS_HOME"
}

# megads_finish STATUS: requeue the job when the run stopped to be resumed, else exit with STATUS.
megads_finish() {
    local status=$1
    if [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; then
        echo "megads: run stopped early with a checkpoint; requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "megads: scontrol requeue failed; resubmit the same command to resume" >&2
    fi
    exit "$status"
}

# megads_launch MODULE CONFIG [overrides]: one launch/run.py per node of the job; it starts the ranks.
megads_launch() {
    local module=$1 status=0
    shift
    echo "megads: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $module $*"
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" \
        --kill-on-bad-exit=0 "$MEGADS_PYTHON" launch/run.py "$module" "$@" || status=$?
    megads_finish "$status"
}
