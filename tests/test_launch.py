"""The launcher without Slurm: rendezvous arguments from SLURM_* environments, the rank
environment, exit statuses, the sbatch scripts' lint, and the preemption stop of pretraining,
SFT and GRPO (a signal to a trainer, to the ranks, or SIGTERM to the launcher)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch import run as launcher
from launch.slurm import SlurmError, slurm_node, slurm_torchrun_args
from megads.checkpoint import CheckpointReader, latest_checkpoint
from megads.config import load_config
from megads.data import prepare_data
from megads.rl import cli as post_training
from megads.rl.grpo_trainer import GRPOTrainer
from megads.rl.sft import SFTTrainer
from megads.train.preemption import REQUEUE_EXIT_CODE, PreemptionSignals
from megads.train.trainer import Trainer
from tests.distributed import run_ranks

HOSTS = {"gpu-node[07-08]": ["gpu-node07", "gpu-node08"]}


def two_node_env(node_id, **extra):
    """What srun gives one launcher task of `srun --ntasks-per-node=1` on 2 nodes, 2 GPUs each."""
    env = {"SLURM_JOB_ID": "31337", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_STEP_NODELIST": "gpu-node[07-08]",
           "SLURM_NODEID": str(node_id), "SLURM_PROCID": str(node_id), "SLURM_LOCALID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "16",
           "SLURMD_NODENAME": f"gpu-node0{7 + node_id}"}
    return {**env, **extra}


def test_two_nodes_two_gpus_each_meet_on_the_first_host():
    nodes = [slurm_node(two_node_env(i), hostnames=HOSTS.__getitem__) for i in (0, 1)]
    common = ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node07:21337",
              "--rdzv-id=megads-31337"]
    assert [slurm_torchrun_args(node) for node in nodes] == [
        common + ["--rdzv-conf=is_host=1", "--max-restarts=0"],      # the first host serves the rendezvous store
        common + ["--rdzv-conf=is_host=0", "--max-restarts=0"]]
    assert [(n.node_rank, n.host, n.cpus) for n in nodes] == [(0, "gpu-node07", 16), (1, "gpu-node08", 16)]


def test_without_gpus_a_node_runs_one_rank_per_cpu():
    env = two_node_env(1, SLURM_CPUS_PER_TASK="2")
    del env["SLURM_GPUS_ON_NODE"]
    node = slurm_node(env, hostnames=HOSTS.__getitem__)
    assert "--nproc-per-node=2" in slurm_torchrun_args(node)
    assert slurm_torchrun_args(slurm_node(env, nproc_per_node=1, hostnames=HOSTS.__getitem__))[1] == "--nproc-per-node=1"
    assert slurm_node({**env, "MEGADS_RDZV_PORT": "29400"}, hostnames=HOSTS.__getitem__).rdzv_endpoint == "gpu-node07:29400"


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "one per node"),
    ({"SLURM_NNODES": "3"}, "expands to 2 hosts but SLURM_NNODES=3"),
    ({"SLURM_CPUS_PER_TASK": "many"}, "SLURM_CPUS_PER_TASK='many' is not an integer"),
])
def test_impossible_allocations_are_refused(change, message):
    with pytest.raises(SlurmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slurm_node(two_node_env(0, **change), hostnames=HOSTS.__getitem__)


def fake_scontrol(tmp_path):
    """An `scontrol` that expands gpu-node[07-08] as the real one does (no Slurm here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-node[07-08]" ] || exit 1\n'
                      'printf "gpu-node07\\ngpu-node08\\n"\n')
    script.chmod(0o755)
    return str(bin_dir)


def test_launcher_command_line_on_the_second_node(tmp_path):
    """`python launch/run.py` as srun starts it on node 1: the torchrun line and rank environment."""
    env = {**os.environ, **two_node_env(1), "PATH": fake_scontrol(tmp_path) + os.pathsep + os.environ["PATH"],
           "MEGADS_LOG_DIR": str(tmp_path / "logs"), "NCCL_DEBUG": "INFO"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "launch/run.py", "--dry-run", "pretrain", "configs/tiny.yaml", "train.steps=5"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=gpu-node07:21337 "
                        "--rdzv-id=megads-31337 --rdzv-conf=is_host=0 --max-restarts=0 -m megads.pretrain configs/tiny.yaml "
                        "train.steps=5")
    assert "OMP_NUM_THREADS=8" in lines                               # 16 CPUs over 2 ranks
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT=1" in lines
    assert f"TORCH_FR_DUMP_TEMP_FILE={tmp_path / 'logs' / '31337' / 'nccl_trace_rank_'}" in lines
    assert not any(line.startswith("NCCL_DEBUG=") for line in lines)  # the caller's NCCL_DEBUG=INFO is kept


def test_local_launch_keeps_the_standalone_interface(capsys):
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "7"}
    assert launcher.main(["--dry-run", "--nproc-per-node", "3", "pretrain", "configs/tiny.yaml", "train.steps=2"],
                         env=env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torchrun --standalone --nproc-per-node=3 -m megads.pretrain configs/tiny.yaml train.steps=2"
    assert not any(line.startswith(("OMP_NUM_THREADS=", "TORCH_FR_DUMP_TEMP_FILE=")) for line in lines)


@pytest.mark.parametrize("module", ["grpo_that_does_not_exist", "no_package.pretrain"])
def test_missing_entry_point_is_refused_before_anything_starts(capsys, module):
    assert launcher.main([module, "configs/tiny.yaml"], env={}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"megads.{module} does not exist" in err


def test_exit_status_of_the_launcher():
    assert launcher.exit_status([REQUEUE_EXIT_CODE]) == REQUEUE_EXIT_CODE
    # the first rank saved and left; torchrun then stopped the others with SIGTERM
    assert launcher.exit_status([REQUEUE_EXIT_CODE, -signal.SIGTERM]) == REQUEUE_EXIT_CODE
    assert launcher.exit_status([2, 1]) == 2
    assert launcher.exit_status([-signal.SIGKILL]) == 128 + signal.SIGKILL


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/install_slurm.sh installs it)")
    scripts = sorted(f"slurm/{name}" for name in os.listdir("slurm") if name.endswith(".sh"))
    scripts += [".ci/run", ".ci/install_slurm.sh"]
    proc = subprocess.run(["shellcheck", "--external-sources", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script, message", [
    ("pretrain.sh", "megads.pretrain does not exist in {home} yet, so there is nothing to run; update the checkout"),
    ("grpo.sh", "megads.grpo does not exist in {home} yet, so there is nothing to run; update the checkout"),
    ("convert.sh", "tools/convert_checkpoint.py does not exist in {home} yet, so there is nothing to run; "
                   "update the checkout"),
])
def test_sbatch_scripts_refuse_to_start_without_their_target(tmp_path, script, message):
    """A checkout that has the scripts and the launcher but not yet the script's target."""
    home = tmp_path / "checkout"
    (home / "launch").mkdir(parents=True)
    (home / "launch" / "run.py").write_text("")
    (home / "megads").mkdir()
    (home / "megads" / "__init__.py").write_text("")
    shutil.copytree("slurm", home / "slurm")
    env = {**os.environ, "MEGADS_HOME": str(home), "MEGADS_PYTHON": sys.executable, "SLURM_JOB_ID": "1"}
    proc = subprocess.run(["bash", str(home / "slurm" / script), "configs/tiny.yaml"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "megads: error: " + message.format(home=home)


SMALL = ["parallel.tp=1", "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "train.seq_len=32", "train.global_batch=2",
         "train.micro_batch=2", "train.eval_interval=0", "data.synthetic_docs=2000", "data.synthetic_valid_docs=100",
         "checkpoint.interval=0"]


def test_signal_stops_training_after_the_step_with_a_checkpoint(tmp_path, data_cache):
    cfg = load_config("configs/tiny.yaml", SMALL + ["train.steps=6", f"train.run_dir={tmp_path}",
                                                     f"data.cache_dir={data_cache}"]).validate(world_size=1)
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    step = trainer.train_step

    def step_then_signal(batches):
        result = step(batches)
        if trainer.step == 1:                       # during the second step (trainer.step counts finished ones)
            os.kill(os.getpid(), signal.SIGUSR1)
        return result
    trainer.train_step = step_then_signal
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionSignals() as preemption:
        result = trainer.fit(preemption)
    assert signal.getsignal(signal.SIGUSR1) is previous       # handlers restored
    assert result["preempted"] and result["steps"] == 2 and preemption.reason == "SIGUSR1"
    assert os.path.basename(latest_checkpoint(cfg.checkpoint_dir)) == "step_00000002"


def _agree(rank, world_size):
    with PreemptionSignals() as preemption:
        before = preemption.stop_agreed(torch.device("cpu"))
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        after = preemption.stop_agreed(torch.device("cpu"))
        return before, after, preemption.reason


def test_all_ranks_stop_when_one_rank_is_signalled():
    results = run_ranks(_agree, 2, (), timeout=120)
    assert [r[:2] for r in results] == [(False, True)] * 2
    assert [r[2] for r in results] == ["another rank's preemption signal", "SIGTERM"]


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> str:
    """The output of a launcher that should have exited; SIGINT (torchrun stops its ranks) if not."""
    try:
        return proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


RANK = """import os, signal, sys, time
if sys.argv[1] == "save":                   # as a trainer does: finish, save, exit for requeue
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
open(os.path.join(sys.argv[2], os.environ["RANK"]), "w").close()
time.sleep(300)
"""


@pytest.mark.parametrize("ranks, status", [("save", REQUEUE_EXIT_CODE), ("die", 128 + signal.SIGTERM)])
def test_sigterm_to_the_launcher_reaches_the_ranks_and_their_status_is_its_own(tmp_path, ranks, status):
    """torchrun under the launcher, with ranks that exit 75 on SIGTERM or die of it (a rank still
    starting up has no handler yet): SIGTERM to the launcher alone reaches both ranks."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    ready = tmp_path / "ready"
    ready.mkdir()
    driver = (f"import sys; from launch.run import run_torchrun; "
              f"sys.exit(run_torchrun(['--standalone', '--nproc-per-node=2', {str(script)!r}, {ranks!r}, {str(ready)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(os.listdir(ready)) == 2, 120, "ranks", proc)
    proc.send_signal(signal.SIGTERM)
    output = stop(proc)
    assert proc.returncode == status, output[-3000:]


def test_sigterm_to_the_launcher_stops_pretraining_with_a_checkpoint_for_requeue(tmp_path, data_cache):
    """`python launch/run.py --nproc-per-node 2 pretrain ...` as users run it, SIGTERM after the first step."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "launch/run.py", "--nproc-per-node", "2", "pretrain", "configs/tiny.yaml",
                             *SMALL, "train.global_batch=4", "train.steps=10000", f"train.run_dir={run_dir}",
                             f"data.cache_dir={data_cache}"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, "first step", proc)
    proc.send_signal(signal.SIGTERM)
    output = stop(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert f"megads: stopped at step {steps[-1]} on SIGTERM, checkpoint saved" in output
    assert 1 <= steps[-1] < 10000
    assert os.path.basename(latest_checkpoint(str(run_dir / "checkpoints"))) == f"step_{steps[-1]:08d}"


def response_length(prompt: str, response: str, answer: str) -> float:
    """A GRPO reward that differs between a random policy's samples, so that its updates are not zero."""
    return float(len(response))


POST_TRAINING = SMALL + ["model.mtp_depth=0", "train.steps=3", "train.global_batch=4", "checkpoint.resume=auto",
                         "sft.eval_problems=4", "sft.eval_interval=0", "grpo.eval_problems=4", "grpo.eval_interval=0",
                         "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8", "grpo.micro_batch=2",
                         "grpo.kl_beta=0.1", f"grpo.rewards=[{__name__}:response_length]"]


def signalled_after_step(trainer_cls, step: int):
    """`trainer_cls` whose process gets SIGTERM during step `step`."""
    class Signalled(trainer_cls):
        def train_step(self) -> dict:
            record = super().train_step()
            if self.step == step - 1:                 # self.step counts the finished steps
                os.kill(os.getpid(), signal.SIGTERM)
            return record
    return Signalled


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, GRPOTrainer])
def test_post_training_stops_on_sigterm_and_resumes_exactly(tmp_path, data_cache, capsys, trainer_cls):
    """`python -m megads.sft / megads.grpo` signalled in step 2 of 3 exit 75 with a checkpoint of step 2;
    the rerun resumes from it and ends with the metrics, weights and Adam moments of an uninterrupted run."""
    def run(cls, name):
        return post_training.main(["configs/tiny.yaml", *POST_TRAINING, f"train.run_dir={tmp_path / name}",
                                   f"data.cache_dir={data_cache}"], cls, "")
    previous = signal.getsignal(signal.SIGTERM)
    assert run(signalled_after_step(trainer_cls, 2), "split") == REQUEUE_EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) is previous
    assert "megads: stopped at step 2 on SIGTERM, checkpoint saved" in capsys.readouterr().out
    assert os.path.basename(latest_checkpoint(str(tmp_path / "split" / "checkpoints"))) == "step_00000002"
    assert run(trainer_cls, "split") == 0 and run(trainer_cls, "whole") == 0

    def metrics(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "step_time_s"} for line in lines]
    assert metrics("split") == metrics("whole") and [r["step"] for r in metrics("whole")] == [0, 1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in metrics("whole")[1:])          # every step moved the weights
    split, whole = (CheckpointReader(latest_checkpoint(str(tmp_path / name / "checkpoints"))) for name in ("split", "whole"))
    assert split.metadata["step"] == whole.metadata["step"] == 3 and split.names() == whole.names()
    for name in whole.names():
        assert torch.equal(split.read(name), whole.read(name)), name
