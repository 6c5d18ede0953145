#!/usr/bin/env python3
"""The one launcher of megads, on a workstation and on every node of a Slurm job.

    python launch/run.py [--nproc-per-node N] [--dry-run] MODULE CONFIG [section.key=value ...]

Locally it runs `torchrun --standalone --nproc-per-node N -m megads.MODULE CONFIG ...` (N defaults
to 1; with N = 1 it still goes through torchrun, so the single-process path is the one users
launch). Inside an srun task (slurm/*.sh start one per node) it derives the multi-node c10d
rendezvous from the allocation, starts one rank per GPU of the node (per CPU without GPUs), and
tees the node's output to $MEGADS_LOG_DIR/<job id>/node<K>-<host>.log (default logs/).

Exit status: 0 when every rank succeeded; 75 when the ranks stopped on a preemption signal
(SIGUSR1 or SIGTERM) after saving a checkpoint (the sbatch scripts then requeue the job);
otherwise the status of the first rank that failed (2: bad input, 3: non-finite training), or
128 + N when a rank was killed by signal N or the launcher stopped on it (SIGINT; SIGTERM before
any rank started).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from types import FrameType

if __package__ in (None, ""):           # run as `python launch/run.py`: import launch.* from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.distributed.elastic.multiprocessing import SignalException

from launch.environment import rank_environment
from launch.slurm import SlurmError, SlurmNode, in_slurm_step, slurm_node, slurm_torchrun_args
from megads.train.preemption import REQUEUE_EXIT_CODE

# The signals torchrun turns into its own shutdown (forward, give the ranks 30 s, kill them, exit
# 128 + N without their exit codes): its defaults less SIGTERM, which the launcher forwards instead.
# PET_SIGNALS_TO_HANDLE is torchrun's --signals-to-handle (torch >= 2.9; older torchrun keeps SIGTERM).
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:            # a missing parent package
        return False


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_torchrun_args(nproc_per_node: int) -> list[str]:
    return ["--standalone", f"--nproc-per-node={nproc_per_node}"]


def node_log_path(log_root: str, node: SlurmNode) -> str:
    return os.path.join(log_root, node.job_id, f"node{node.node_rank}-{node.host}.log")


def exit_status(exitcodes_by_time: list[int]) -> int:
    """The launcher's status from the failed ranks' exit codes, earliest failure first.

    One rank exiting with REQUEUE_EXIT_CODE means the checkpoint is complete (ranks leave only
    after its last barrier), so the job is requeued even if torchrun then stopped the others."""
    if REQUEUE_EXIT_CODE in exitcodes_by_time:
        return REQUEUE_EXIT_CODE
    first = exitcodes_by_time[0]
    return 128 - first if first < 0 else first


def child_pids() -> list[int]:
    """The processes whose parent is this one: the ranks torchrun started (from Linux's /proc)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])   # the fields after "(command)": state, ppid
        except (OSError, IndexError, ValueError):                       # gone meanwhile
            continue
        if ppid == os.getpid():
            pids.append(int(entry))
    return pids


def forward_to_ranks(signum: int, frame: FrameType | None) -> None:
    """Pass a preemption signal on to the ranks (torchrun starts them in sessions of their own, so
    a signal for the launcher alone misses them): they finish their step, save and exit 75, and
    torchrun then ends as on any rank's exit. With no rank running yet, stop as torchrun would."""
    pids = child_pids()
    if not pids:
        raise SignalException(f"launcher got {signal.Signals(signum).name} before the ranks started",
                              signal.Signals(signum))
    for pid in pids:
        with suppress(ProcessLookupError):      # exited meanwhile
            os.kill(pid, signum)


def run_torchrun(args: list[str]) -> int:
    """torchrun in this process, so that the ranks' own exit codes are known (its CLI exits 1).

    The preemption warning (SIGUSR1) is for the ranks, which install their handler at start;
    ignored here, the launcher survives it and the ranks inherit "ignore" until then. SIGTERM
    is forwarded to the ranks while they run, then ignored: it must not replace their status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    os.environ["PET_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward_to_ranks)
    try:
        torchrun_main(args)
    except ChildFailedError as err:
        failures = sorted(err.failures.values(), key=lambda failure: failure.timestamp)
        return exit_status([failure.exitcode for failure in failures])
    except SignalException as err:
        return 128 + int(err.sigval)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


@contextmanager
def tee_output(path: str) -> Iterator[None]:
    """Copy everything written to this process's stdout and stderr — and so its children's —
    into `path` as well (appending: a requeued job keeps one log per node)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = threading.Lock()

    def pump(read_fd: int, original_fd: int, log) -> None:
        while chunk := os.read(read_fd, 1 << 16):
            os.write(original_fd, chunk)
            with lock:
                log.write(chunk)
                log.flush()
        os.close(read_fd)

    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab") as log:
        streams = []
        for fd in (1, 2):
            original = os.dup(fd)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, fd)
            os.close(write_fd)
            thread = threading.Thread(target=pump, args=(read_fd, original, log), daemon=True)
            thread.start()
            streams.append((fd, original, thread))
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original, _ in streams:
                os.dup2(original, fd)        # drops this process's write end: the pump sees EOF
            for _, original, thread in streams:
                thread.join(timeout=30)      # a detached grandchild may keep the pipe open: do not wait on it
                if not thread.is_alive():
                    os.close(original)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks on this machine (default: 1 locally; under Slurm the GPUs, else the CPUs, of the node)")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun arguments and environment, run nothing")
    parser.add_argument("module", help="megads entry point: pretrain, grpo, ...")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="config path and section.key=value overrides")
    opts = parser.parse_args(argv)
    env = dict(os.environ if env is None else env)
    if not module_exists(f"megads.{opts.module}"):
        print(f"launch/run.py: error: megads.{opts.module} does not exist in this checkout; "
              f"pick an existing entry point (e.g. pretrain)", file=sys.stderr)
        return 2
    if opts.nproc_per_node is not None and opts.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be at least 1, got {opts.nproc_per_node}")

    node = None
    if in_slurm_step(env):
        try:
            node = slurm_node(env, opts.nproc_per_node)
        except SlurmError as err:
            print(f"launch/run.py: error: {err}", file=sys.stderr)
            return 2
        torchrun_args, nproc, cpus = slurm_torchrun_args(node), node.nproc_per_node, node.cpus
        log_path = node_log_path(env.get("MEGADS_LOG_DIR", "logs"), node)
    else:
        nproc = opts.nproc_per_node or 1
        torchrun_args, cpus, log_path = local_torchrun_args(nproc), local_cpus(), None
    command = [*torchrun_args, "-m", f"megads.{opts.module}", *opts.args]
    rank_env = rank_environment(env, nproc, cpus, os.path.dirname(log_path) if log_path else None)
    if opts.dry_run:
        print("torchrun " + " ".join(command))
        for key in sorted(rank_env):
            if env.get(key) != rank_env[key]:
                print(f"{key}={rank_env[key]}")
        return 0

    os.environ.clear()
    os.environ.update(rank_env)
    with tee_output(log_path) if log_path else nullcontext():
        if node is not None:
            print(f"megads launch: job {node.job_id} (restart {node.restart}) node {node.node_rank}/{node.nnodes} "
                  f"{node.host}: torchrun {' '.join(command)}", flush=True)
        status = run_torchrun(command)
        if node is not None:
            print(f"megads launch: node {node.node_rank} {node.host} exits with status {status} at {time.strftime('%H:%M:%S')}",
                  flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
