"""The launcher without Slurm: rendezvous arguments from SLURM_* environments, the rank
environment, exit statuses, the sbatch scripts' lint, and the trainer's preemption stop."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from launch import run as launcher
from launch.slurm import SlurmError, slurm_node, slurm_torchrun_args
from megads.checkpoint import latest_checkpoint
from megads.config import load_config
from megads.data import prepare_data
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
