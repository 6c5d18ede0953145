"""The run directory's rules, applied by rank 0 before any process group or file exists.

- One line of history. A run directory holds one run: `checkpoint.resume=auto` continues it.
  A start that would begin a new history there (`checkpoint.resume=none`, `checkpoint.weights_only`,
  or `checkpoint.resume=PATH` naming anything but the run's latest checkpoint) is refused while
  the directory holds checkpoints or metrics, naming the choices; with
  `train.archive_previous_run=true` a fresh start moves the old run to
  `<run_dir>/previous/<time>/` first. Nothing is ever deleted here.
- One job at a time. `RunLock` holds `<dir>/.megads.lock` (an flock, plus who holds it) for the
  job's life; a lock left by a dead process on this host, or by an earlier run of the same Slurm
  job (a requeue), is taken over with a message; a live holder is refused.
- metrics.jsonl is readable: a torn last line (a crash mid-write) is tolerated by MetricsWriter,
  a damaged line before it is refused here, naming the line.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from megads.config import Config, ConfigError

log = logging.getLogger("megads")
LOCK_FILE = ".megads.lock"
RUN_FILES = ("metrics.jsonl", "tb", "pipeline_trace.json")


def prepare_run_dir(cfg: Config) -> None:
    """Refuse (ConfigError) or archive before a start that would mix two runs in one directory."""
    from megads.checkpoint.sharded import latest_checkpoint
    check_metrics_file(os.path.join(cfg.run_dir, "metrics.jsonl"))
    c = cfg.checkpoint
    latest = latest_checkpoint(cfg.checkpoint_dir)
    held = _held_run(cfg, latest)
    if held is None or (c.resume == "auto" and not c.weights_only):
        return
    if c.resume not in ("auto", "none") and not c.weights_only and latest is not None \
            and os.path.realpath(c.resume) in (os.path.realpath(latest), os.path.realpath(cfg.checkpoint_dir)):
        return                                          # resume=PATH naming this run's own latest checkpoint
    start = "a fresh start" if c.resume in ("auto", "none") else f"checkpoint.resume={c.resume}" + \
        (" with checkpoint.weights_only=true" if c.weights_only else "")
    if cfg.train.archive_previous_run and (c.resume == "none" or c.weights_only):
        archive = archive_run(cfg)
        log.info(f"train.run_dir={cfg.run_dir} held {held}; moved it to {archive} for {start}")
        return
    raise ConfigError(f"train.run_dir={cfg.run_dir} already holds {held}, and {start} would begin a second history "
                      f"there: continue that run with checkpoint.resume=auto, choose a new train.run_dir, or set "
                      f"train.archive_previous_run=true to move the old run to {cfg.run_dir}/previous/ first")


def _held_run(cfg: Config, latest: str | None) -> str | None:
    """What of an earlier run the directories hold ("checkpoints up to step_00000008 and
    metrics.jsonl"), or None."""
    parts = [f"checkpoints up to {os.path.basename(latest)}"] if latest else []
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        parts.append("metrics.jsonl")
    return " and ".join(parts) or None


def archive_run(cfg: Config) -> str:
    """Move the run's checkpoints, metrics and TensorBoard files to <run_dir>/previous/<time>/."""
    target = os.path.join(cfg.run_dir, "previous", time.strftime("%Y%m%d-%H%M%S"))
    while os.path.exists(target):
        target += "+"
    os.makedirs(target)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(cfg.run_dir, name)):
            shutil.move(os.path.join(cfg.run_dir, name), os.path.join(target, name))
    if os.path.isdir(cfg.checkpoint_dir):
        os.makedirs(os.path.join(target, "checkpoints"))
        for name in os.listdir(cfg.checkpoint_dir):
            if name != LOCK_FILE:
                shutil.move(os.path.join(cfg.checkpoint_dir, name), os.path.join(target, "checkpoints", name))
    return target


def check_metrics_file(path: str) -> None:
    """Refuse a metrics.jsonl with a damaged line other than the last (the last may be torn)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines[:-1], 1):
        if line.strip() and parse_record(line) is None:
            raise ConfigError(f"{path} line {number} is damaged (not a JSON object); repair or delete that line, "
                              f"or move the file away")


def parse_record(line: bytes | str) -> dict | None:
    """One metrics.jsonl line as a dict, or None when it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """Exclusive use of a run directory (and a checkpoint directory outside it) by one job:
    `with RunLock(cfg.run_dir, cfg.checkpoint_dir): ...`.

    The lock file records host, pid, start time and Slurm job id. flock makes two jobs on
    one host (or on a file system that supports it) exclude each other; the record lets a job on
    another host be named and refused, and a requeued Slurm job take its own lock over."""

    def __init__(self, run_dir: str, checkpoint_dir: str):
        run_dir, checkpoint_dir = os.path.abspath(run_dir), os.path.abspath(checkpoint_dir)
        inside = os.path.commonpath([run_dir, checkpoint_dir]) == run_dir
        self.paths = [os.path.join(d, LOCK_FILE) for d in ([run_dir] if inside else [run_dir, checkpoint_dir])]
        self._fds: list[int] = []

    def __enter__(self) -> "RunLock":
        try:
            for path in self.paths:
                self._fds.append(_acquire(path))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        for path, fd in zip(self.paths, self._fds):
            with suppress(FileNotFoundError):
                os.remove(path)                 # while still locked: a waiting job re-opens the new file
            os.close(fd)
        self._fds.clear()


def _locked_fd(path: str) -> int:
    """An fd of `path` holding its flock; the file is re-opened if it was replaced meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"{os.path.dirname(path)} is in use by {_describe(_read_holder(path))}; wait for that "
                              f"run to end or choose another train.run_dir / checkpoint.dir") from None
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)                            # released and removed by its holder meanwhile: try again


def _acquire(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = _locked_fd(path)
    holder, me = _read_holder(path), _identity()
    if holder:
        if holder.get("host") != me["host"] and not _same_job(holder, me):
            os.close(fd)
            raise ConfigError(f"{os.path.dirname(path)} is locked by {_describe(holder)}; if that run has ended, "
                              f"delete {path} and start again")
        log.warning(f"taking over {path} from {_describe(holder)}, which is "
                    f"{'an earlier run of this job' if _same_job(holder, me) else 'no longer running'}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return fd


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _same_job(holder: dict, me: dict) -> bool:
    return holder.get("job") is not None and holder.get("job") == me["job"]


def _read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another megads run"
    job = f"Slurm job {holder['job']}, " if holder.get("job") else ""
    return f"the megads run started {holder.get('started')} ({job}pid {holder.get('pid')} on {holder.get('host')})"


@contextmanager
def claim_run_dir(cfg: Config, rank: int) -> Iterator[None]:
    """On rank 0: lock the run (and checkpoint) directory for the block and apply the history rules
    above. Other ranks leave the directories to rank 0."""
    if rank != 0:
        yield
        return
    with RunLock(cfg.run_dir, cfg.checkpoint_dir):
        prepare_run_dir(cfg)
        yield
