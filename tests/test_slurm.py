"""megads on a real Slurm: a one-node cluster on this machine (Debian's slurmctld, slurmd and
munge), the sbatch scripts submitted as users submit them, and a preempted job that requeues,
resumes and ends with exactly the weights of an uninterrupted run."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from megads.checkpoint import CheckpointReader, latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = os.path.join(ROOT, ".ci", "install_slurm.sh")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged")
STEPS = 12
DATA = ["data.synthetic_docs=2000", "data.synthetic_valid_docs=100"]     # a small corpus and its tokenizer
# The tiny model on 4 ranks (DP=2 x TP=2, as configs/tiny.yaml lays it out), cut to short steps.
RUN = ["train.global_batch=4", "train.micro_batch=2", "train.seq_len=64", "train.log_interval=1",
       f"train.eval_interval={STEPS}", "train.eval_batches=1", "checkpoint.interval=0", *DATA]
# The scripts default to 8 GPUs a node; the time limit leaves room for the 10-minute warning signal.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=4", "--time=30"]


def slurm_unavailable() -> str | None:
    """Why this machine cannot run a local Slurm cluster, or None (installing it when it can)."""
    if all(shutil.which(name) for name in DAEMONS):
        return None if os.geteuid() == 0 else "slurmd has to run as root to start jobs; run the tests as root"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "Slurm is not installed and this machine cannot install Debian packages (needs root and apt-get)"
    proc = subprocess.run(["bash", INSTALL], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not all(shutil.which(name) for name in DAEMONS):
        return f"installing Slurm with .ci/install_slurm.sh failed: {proc.stderr.strip()[-400:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """slurmctld + slurmd for this host, configured under `workdir`; munged shared with the system."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(workdir, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.started_munged = self._ensure_munged()
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(workdir, sub))
        with open(self.conf, "w") as f:
            f.write(self._config())
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", self.conf], check=True, env=self.env, timeout=60)
        self._wait_for_idle_node()

    def _config(self) -> str:
        w = self.workdir
        # The node declares 8 CPUs whatever the machine has (config_overrides): a 4-rank job fits twice.
        return f"""ClusterName=megads-test
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.log
NodeName={self.host} CPUs=8 Sockets=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    @staticmethod
    def _ensure_munged() -> bool:
        """Start munged unless one already answers; True when this fixture started it."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return False
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True, timeout=60)
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=60)
        return True

    def _wait_for_idle_node(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-n", self.host, "-o", "%t").stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test node never became idle (state {state!r}); see {self.workdir}/slurmd.log")

    def run(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=ROOT, check=check, timeout=60)

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**self.env, **(env or {})})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=True).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return job
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s: {self.job(job_id)['JobState']}")

    def stop(self) -> None:
        self.run("scancel", "--user=root")
        for name in ("slurmd", "slurmctld"):
            with open(os.path.join(self.workdir, f"{name}.pid")) as f:
                pid = int(f.read())
            os.kill(pid, 15)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
        if self.started_munged:
            with open("/run/munge/munged.pid") as f:
                os.kill(int(f.read()), 15)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    yield cluster
    cluster.stop()


def pretrain_job(slurm, tmp, name, data_cache):
    """Submit slurm/pretrain.sh for the 4-rank tiny model as a user would, plus CPU-only options
    (and --oversubscribe instead of the script's --exclusive, so that two jobs share the node)."""
    run_dir = os.path.join(tmp, name)
    job_id = slurm.sbatch(*CPU_JOB, "--oversubscribe", f"--output={tmp}/{name}-%j.out", "slurm/pretrain.sh",
                          "configs/tiny.yaml", f"train.steps={STEPS}", *RUN, f"train.run_dir={run_dir}",
                          f"data.cache_dir={data_cache}",
                          env={"MEGADS_PYTHON": sys.executable, "MEGADS_LOG_DIR": os.path.join(tmp, "logs")})
    return {"id": job_id, "run_dir": run_dir, "output": os.path.join(tmp, f"{name}-{job_id}.out"),
            "logs": os.path.join(tmp, "logs")}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_tensors(run_dir):
    reader = CheckpointReader(latest_checkpoint(os.path.join(run_dir, "checkpoints")))
    return reader.metadata["step"], {name: reader.read(name) for name in reader.names()}


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory, data_cache):
    """The same 4-rank job twice, side by side on the node: once uninterrupted, once signalled
    with `scancel --signal=USR1` after its second step (it saves, requeues and resumes)."""
    tmp = str(tmp_path_factory.mktemp("runs"))
    whole = pretrain_job(slurm, tmp, "whole", data_cache)
    preempted = pretrain_job(slurm, tmp, "preempted", data_cache)
    deadline = time.monotonic() + 300
    while not (os.path.exists(os.path.join(preempted["run_dir"], "metrics.jsonl"))
               and len(read_metrics(preempted["run_dir"])) >= 3):    # the step-0 validation and 2 steps
        assert time.monotonic() < deadline and slurm.job(preempted["id"])["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", preempted["id"], check=True)
    for run in (whole, preempted):
        run["job"] = slurm.wait(run["id"], timeout=480)
        with open(run["output"]) as f:
            run["text"] = f.read()
    return whole, preempted


def test_pretrain_job_runs_the_tiny_model_on_4_ranks(slurm, runs):
    whole, _ = runs
    output = whole["text"]
    assert whole["job"]["JobState"] == "COMPLETED" and whole["job"]["ExitCode"] == "0:0", output[-3000:]
    assert whole["job"]["Restarts"] == "0"
    rows = read_metrics(whole["run_dir"])
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))     # one writer, every step
    assert losses[-1] < losses[0] and all(r["grad_norm"] > 0 for r in rows if "loss" in r)
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0]
    step, tensors = checkpoint_tensors(whole["run_dir"])
    assert step == STEPS and any(name.startswith("model.") for name in tensors)
    assert f"--nnodes=1 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint={slurm.host}:" in output
    assert f"step {STEPS}/{STEPS}" in output and f"run directory: {whole['run_dir']}" in output
    with open(os.path.join(whole["logs"], whole["id"], f"node0-{slurm.host}.log")) as f:
        node_log = f.read()
    assert f"step {STEPS}/{STEPS}" in node_log and "exits with status 0" in node_log


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(runs):
    whole, preempted = runs
    job, output = preempted["job"], preempted["text"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", output[-3000:]
    stopped = int(re.search(r"megads: stopped at step (\d+) on SIGUSR1, checkpoint saved", output).group(1))
    assert 2 <= stopped < STEPS
    assert f"requeueing job {preempted['id']}" in output and "restart 1" in output
    assert re.search(rf"resumed from \S+step_{stopped:08d} at step {stopped}", output)

    keys = ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "valid_loss")
    rows = [[{k: r.get(k) for k in keys} for r in read_metrics(run["run_dir"])] for run in (whole, preempted)]
    assert rows[0] == rows[1]
    (whole_step, weights), (split_step, split_weights) = map(checkpoint_tensors, (whole["run_dir"], preempted["run_dir"]))
    assert whole_step == split_step == STEPS and weights.keys() == split_weights.keys()
    for name in weights:                                   # weights and Adam moments, bit for bit
        assert torch.equal(weights[name], split_weights[name]), name


def test_grpo_job_post_trains_the_pretrained_checkpoint(slurm, runs, tmp_path, data_cache):
    """slurm/grpo.sh on 4 ranks (DP=4 x EP=2) from the pretraining job's checkpoint: two GRPO steps,
    held-out evaluation, a checkpoint of the post-trained policy."""
    whole, _ = runs
    run_dir = tmp_path / "grpo"
    job_id = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/%j.out", "slurm/grpo.sh", "configs/grpo-tiny.yaml",
                          f"grpo.init={whole['run_dir']}/checkpoints", "parallel.ep=2", "train.steps=2",
                          "grpo.prompts_per_step=8", "grpo.group_size=4", "grpo.micro_batch=8",
                          "grpo.max_new_tokens=16", "grpo.eval_problems=16", "train.log_interval=1",
                          f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", *DATA,
                          env={"MEGADS_PYTHON": sys.executable, "MEGADS_LOG_DIR": str(tmp_path / "logs")})
    job = slurm.wait(job_id, timeout=300)
    with open(tmp_path / f"{job_id}.out") as f:
        output = f.read()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    assert "--nproc-per-node=4" in output
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2]
    step, tensors = checkpoint_tensors(run_dir)
    assert step == 2 and any(name.startswith("model.") for name in tensors)


@pytest.mark.parametrize("script, args, status, expected", [
    # past the check that megads.grpo exists, the script stops at the missing config, before srun
    ("slurm/grpo.sh", ["configs/no-such-config.yaml"], "2:0", f"megads: error: config configs/no-such-config.yaml not found in {ROOT}"),
    ("slurm/convert.sh", ["--help"], "0:0", "usage: convert_checkpoint.py"),
])
def test_grpo_and_convert_scripts_start_their_targets(slurm, tmp_path, script, args, status, expected):
    """(tests/test_launch.py checks that they refuse to start while their target is missing.)"""
    job_id = slurm.sbatch("--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--output={tmp_path}/%j.out",
                          script, *args, env={"MEGADS_PYTHON": sys.executable, "MEGADS_LOG_DIR": str(tmp_path / "logs")})
    job = slurm.wait(job_id, timeout=120)
    with open(tmp_path / f"{job_id}.out") as f:
        output = f.read()
    assert job["ExitCode"] == status and expected in output, output
