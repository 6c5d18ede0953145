"""What a long run must survive: a run directory holds one history and one job, non-finite
states never reach a checkpoint, metrics.jsonl survives a torn write, ranks die with their
launcher, and a run killed at random points (launcher or rank, during steps or checkpoint
writes) continues bitwise."""
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from megads import pretrain
from megads.checkpoint import CheckpointReader, latest_checkpoint
from megads.config import load_config
from megads.data import prepare_data
from megads.train.run_dir import LOCK_FILE, RunLock
from megads.train.loop import NonFiniteError
from megads.train.trainer import Trainer

SMALL = ["parallel.tp=1", "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "train.seq_len=32", "train.global_batch=4",
         "train.micro_batch=2", "train.eval_interval=0", "train.log_interval=1", "data.synthetic_docs=2000",
         "data.synthetic_valid_docs=100"]


def run(capsys, run_dir, cache, *overrides) -> tuple[int, str]:
    """`python -m megads.pretrain` in this process; (exit status, what it wrote to stderr)."""
    code = pretrain.main(["configs/tiny.yaml", *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={cache}",
                          *overrides])
    return code, capsys.readouterr().err.strip()


def steps_of(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir) -> list[str]:
    return sorted(d for d in os.listdir(run_dir / "checkpoints") if d.startswith("step_"))


# ----------------------------------------------------------------------------- one history per run directory

def test_fresh_start_into_a_used_run_directory_is_refused_or_archived(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, run_dir, data_cache, "train.steps=4", "checkpoint.interval=2")[0] == 0
    old_metrics = (run_dir / "metrics.jsonl").read_text()

    code, err = run(capsys, run_dir, data_cache, "train.steps=3", "checkpoint.interval=1", "checkpoint.resume=none")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"train.run_dir={run_dir} already holds checkpoints up to step_00000004 and metrics.jsonl" in err
    assert "checkpoint.resume=auto" in err and "train.archive_previous_run=true" in err
    assert checkpoints(run_dir) == ["step_00000002", "step_00000004"]          # nothing deleted or written
    assert (run_dir / "metrics.jsonl").read_text() == old_metrics
    assert not (run_dir / LOCK_FILE).exists()

    older = run_dir / "checkpoints" / "step_00000002"                        # a branch from an older point
    code, err = run(capsys, run_dir, data_cache, "train.steps=3", f"checkpoint.resume={older}")
    assert code == 2 and f"checkpoint.resume={older} would begin a second history" in err

    code, _ = run(capsys, run_dir, data_cache, "train.steps=3", "checkpoint.interval=1", "checkpoint.resume=none",
                  "train.archive_previous_run=true")
    assert code == 0
    [archive] = os.listdir(run_dir / "previous")
    archived = run_dir / "previous" / archive
    assert (archived / "metrics.jsonl").read_text() == old_metrics
    assert sorted(os.listdir(archived / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    assert checkpoints(run_dir) == ["step_00000002", "step_00000003"]          # keep_last=2 of the new run
    assert latest_checkpoint(str(run_dir / "checkpoints")).endswith("step_00000003")
    assert steps_of(run_dir) == [1, 2, 3]

    assert run(capsys, run_dir, data_cache, "train.steps=4")[0] == 0            # a plain rerun continues the new run
    assert steps_of(run_dir) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- non-finite states

def test_a_divergent_run_keeps_its_healthy_checkpoints(tmp_path, data_cache, capsys):
    """lr 1e9: the losses become non-finite; no checkpoint is written from the skipped steps, so
    the healthy ones survive keep_last, and the error names the one to go back to."""
    run_dir = tmp_path / "run"
    code, err = run(capsys, run_dir, data_cache, "train.lr=1e9", "train.min_lr=0", "train.warmup_steps=0",
                    "train.steps=12", "checkpoint.interval=1", "checkpoint.keep_last=2")
    assert code == 3, err
    latest = latest_checkpoint(str(run_dir / "checkpoints"))
    assert f"checkpoint.resume={latest}" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    healthy = [r["step"] for r in rows if not r["skipped"]]
    assert any(r["skipped"] for r in rows)
    assert checkpoints(run_dir) == [f"step_{s:08d}" for s in healthy[-2:]]
    for name in checkpoints(run_dir):
        reader = CheckpointReader(str(run_dir / "checkpoints" / name))
        assert all(reader.read(t).float().isfinite().all() for t in reader.names("model.")), name


def test_an_update_that_makes_weights_non_finite_stops_before_any_checkpoint(tmp_path, data_cache):
    cfg = load_config("configs/tiny.yaml", SMALL + [f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}",
                                                    "train.steps=4", "checkpoint.interval=1"]).validate(world_size=1)
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    weight = trainer.model.get_parameter("layers.1.self_attn.o_proj.weight")
    step = trainer.stepper.step

    def overflowing_step():                    # finite gradients, an update that overflows one weight
        outcome = step()
        if trainer.step == 1:
            weight.data[0, 0] = float("inf")
        return outcome
    trainer.stepper.step = overflowing_step
    with pytest.raises(NonFiniteError, match=r"the update of step 2 made layers\.1\.self_attn\.o_proj\.weight non-finite"
                                             r".*step_00000001"):
        trainer.fit()
    assert checkpoints(tmp_path) == ["step_00000001"]


# ----------------------------------------------------------------------------- a damaged checkpoint

def test_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, data_cache, capsys):
    """The rerun meets a checkpoint whose piece file has one float overwritten (same size): refused
    like a bad setting, before any step, naming the file and the fix; the run is left as it was."""
    run_dir = tmp_path / "run"
    assert run(capsys, run_dir, data_cache, "train.steps=2", "checkpoint.interval=1")[0] == 0
    latest = latest_checkpoint(str(run_dir / "checkpoints"))
    piece = sorted(f for f in os.listdir(latest) if f.endswith(".safetensors"))[0]
    with open(os.path.join(latest, piece), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\xc0\x7f")                                 # a NaN where a weight was
    metrics = (run_dir / "metrics.jsonl").read_text()
    code, err = run(capsys, run_dir, data_cache, "train.steps=4")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"checkpoint file {os.path.join(latest, piece)} is damaged" in err and "sha256" in err
    assert (run_dir / "metrics.jsonl").read_text() == metrics and checkpoints(run_dir)[-1] == "step_00000002"


# ----------------------------------------------------------------------------- metrics.jsonl

def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, data_cache, capsys, caplog):
    run_dir = tmp_path / "run"
    assert run(capsys, run_dir, data_cache, "train.steps=2", "checkpoint.interval=1")[0] == 0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')                          # the disk filled mid-line
    with caplog.at_level(logging.WARNING, logger="megads"):
        assert run(capsys, run_dir, data_cache, "train.steps=3")[0] == 0
    assert "dropping a torn last line" in caplog.text
    assert steps_of(run_dir) == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_refused(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, run_dir, data_cache, "train.steps=2", "checkpoint.interval=1")[0] == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0][:-3], *lines[1:]]) + "\n")
    code, err = run(capsys, run_dir, data_cache, "train.steps=3")
    assert code == 2 and len(err.splitlines()) == 1 and f"{run_dir / 'metrics.jsonl'} line 1 is damaged" in err


# ----------------------------------------------------------------------------- one job per run directory

def test_a_second_job_is_refused_and_a_stale_lock_taken_over(tmp_path, data_cache, capsys, caplog, monkeypatch):
    run_dir = tmp_path / "run"
    with RunLock(str(run_dir), str(run_dir / "checkpoints")):                # a live run in this directory
        code, err = run(capsys, run_dir, data_cache, "train.steps=1")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{run_dir} is in use by the megads run started" in err and f"pid {os.getpid()}" in err

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "job": None, "started": "2026-01-01 00:00:00"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="megads"):
        assert run(capsys, run_dir, data_cache, "train.steps=1")[0] == 0
    assert f"pid {stale['pid']} on {stale['host']}" in caplog.text and "no longer running" in caplog.text
    assert not (run_dir / LOCK_FILE).exists()                                  # released at the end

    elsewhere = {**stale, "host": "another-host", "job": "4242"}                # cannot be checked from here
    (run_dir / LOCK_FILE).write_text(json.dumps(elsewhere))
    code, err = run(capsys, run_dir, data_cache, "train.steps=2")
    assert code == 2 and "is locked by the megads run started" in err and f"delete {run_dir / LOCK_FILE}" in err
    monkeypatch.setenv("SLURM_JOB_ID", "4242")                                  # the same job, requeued
    assert run(capsys, run_dir, data_cache, "train.steps=2")[0] == 0
    assert steps_of(run_dir) == [1, 2]


# ----------------------------------------------------------------------------- killed at random points

def launch(run_dir, cache, steps: int) -> subprocess.Popen:
    """`python launch/run.py --nproc-per-node 2 pretrain ...` as users run it."""
    return subprocess.Popen([sys.executable, "launch/run.py", "--nproc-per-node", "2", "pretrain", "configs/tiny.yaml",
                             *SMALL, "parallel.ep=2", f"train.steps={steps}", "checkpoint.interval=1",
                             f"train.run_dir={run_dir}", f"data.cache_dir={cache}"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)


def metric_lines(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ranks_end_with_a_killed_launcher(tmp_path, data_cache):
    """SIGKILL of the launcher (the OOM killer, a careless kill -9): its ranks must not train on
    unsupervised; they exit within seconds."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, data_cache, 100000)
    wait_until(lambda: metric_lines(run_dir) > 0 or proc.poll() is not None, 300, "the first step")
    ranks = children(proc.pid)
    assert proc.poll() is None and len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in ranks), 30, "the end of the ranks")
    output = proc.communicate(timeout=60)[0]
    # The first rank to notice exits; the other may instead fail in a collective with it, first.
    assert f"its launcher (pid {proc.pid}) is gone; stopping" in output, output[-3000:]


@pytest.mark.timeout(900)
def test_killed_launcher_and_ranks_continue_bitwise(tmp_path, data_cache):
    """SIGKILL of the launcher (its ranks must follow it) or of one rank, at random moments of a
    2-rank run that checkpoints every step (so some kills land inside checkpoint writes); each
    rerun resumes, and the end equals an uninterrupted run bit for bit."""
    steps, seed = 8, random.randrange(1 << 16)
    rng = random.Random(seed)
    whole = launch(tmp_path / "whole", data_cache, steps)
    assert whole.wait(timeout=600) == 0, whole.communicate()[0][-3000:]

    run_dir, kills = tmp_path / "killed", 0
    for target in ("launcher", "rank"):
        proc = launch(run_dir, data_cache, steps)
        start = metric_lines(run_dir)
        wait_until(lambda: metric_lines(run_dir) > start or proc.poll() is not None, 300, f"a step (seed {seed})")
        time.sleep(rng.uniform(0.0, 1.5))
        ranks = children(proc.pid)
        if proc.poll() is not None or not ranks:
            continue                                            # finished before the kill: nothing to test here
        os.kill(proc.pid if target == "launcher" else rng.choice(ranks), signal.SIGKILL)
        kills += 1
        wait_until(lambda: not any(alive(pid) for pid in ranks), 30,
                   f"end of the ranks after the {target} was killed (seed {seed})")
        proc.communicate(timeout=60)
    assert kills >= 1, f"every run ended before its kill (seed {seed})"
    rerun = launch(run_dir, data_cache, steps)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]
    assert losses("killed") == losses("whole"), f"seed {seed}"
    a, b = (CheckpointReader(latest_checkpoint(str(tmp_path / name / "checkpoints"))) for name in ("whole", "killed"))
    assert a.metadata["step"] == b.metadata["step"] == steps and a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.read(name), b.read(name)), (name, seed)
