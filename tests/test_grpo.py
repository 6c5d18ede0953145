"""GRPO end to end on CPU, the README's chain: from the demo's pretrained checkpoint and the SFT
cold start (configs/sft-tiny.yaml), GRPO (configs/grpo-tiny.yaml) raises held-out greedy accuracy
while the same run with shuffled rewards does not; a 4-rank run's first update equals the
single-process one; the result is a megads checkpoint that converts to HuggingFace."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megads.checkpoint import CheckpointReader, latest_checkpoint, load_model_weights
from megads.checkpoint.convert import from_hf, to_hf
from megads.config import load_config
from megads.data import prepare_data
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import build_mesh
from megads.rl.grpo_trainer import GRPOTrainer
from megads.rl.sft import SFTTrainer
from tests.distributed import run_ranks
from test_parallel_core import assert_close

# Timeouts, from runs on a loaded 2-core machine: a test here may first have to set up the README demo
# (129-174 s) and the SFT cold start (160-171 s); the GRPO arms then took 270-330 s, the 4-rank test under 60 s.
pytestmark = pytest.mark.timeout(900)

COMMON = ["parallel.tp=1", "checkpoint.resume=none", "train.log_interval=10"]
GRPO = ["checkpoint.save_at_end=false"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, demo_run):
    """The SFT cold start from the demo's checkpoint; (checkpoint path, SFT held-out accuracies)."""
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    run_dir = tmp_path_factory.mktemp("grpo_chain") / "sft"
    cfg = load_config("configs/sft-tiny.yaml", COMMON + [f"train.run_dir={run_dir}", f"data.cache_dir={demo_run.cache_dir}",
                                                         f"sft.init={os.path.join(demo_run.run_dir, 'checkpoints')}"]
                      ).validate()
    # One thread: with two, SFT took 435-735 s instead of 160-171 s while other work shared the 2 cores
    # (the threads meet at every operation, so one descheduled thread stalls both).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        SFTTrainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size).tokenizer).fit()      # stops at 30% accuracy
    finally:
        torch.set_num_threads(threads)
    accuracy = [r["eval_accuracy"] for r in read_metrics(run_dir) if "eval_accuracy" in r]
    return str(run_dir / "checkpoints"), accuracy


def test_sft_reaches_a_useful_starting_accuracy(sft_checkpoint):
    _, accuracy = sft_checkpoint
    assert accuracy[0] < 0.05                       # the pretrained model rarely gets an exact answer
    assert 0.2 <= accuracy[-1] <= 0.5               # SFT: enough right answers for group rewards to differ


def grpo_command(run_dir, cache, init, *extra):
    return [sys.executable, "-m", "megads.grpo", "configs/grpo-tiny.yaml", *COMMON, *GRPO, f"train.run_dir={run_dir}",
            f"data.cache_dir={cache}", f"grpo.init={init}", *extra]


@pytest.mark.timeout(1200)
def test_grpo_raises_held_out_accuracy_and_shuffled_rewards_do_not(sft_checkpoint, tmp_path, demo_run):
    init, _ = sft_checkpoint
    env = dict(os.environ, OMP_NUM_THREADS="1")
    arms = {"grpo": [], "shuffled": ["grpo.shuffle_rewards=true"]}
    procs = {name: subprocess.Popen(grpo_command(tmp_path / name, demo_run.cache_dir, init, *extra), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in arms.items()}
    try:
        for name, proc in procs.items():            # both arms run at once, one core each
            output, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"{name}:\n{output}"
    finally:                                        # a failed or timed-out test leaves no arm running
        for proc in procs.values():
            proc.kill()
            proc.wait()
    curves = {name: [(r["step"], r["eval_accuracy"]) for r in read_metrics(tmp_path / name) if "eval_accuracy" in r]
              for name in arms}
    start = curves["grpo"][0][1]
    assert curves["shuffled"][0][1] == start        # same starting policy and evaluation
    assert curves["grpo"][-1][1] - start >= 0.15, curves               # GRPO learns from its rewards ...
    assert curves["shuffled"][-1][1] - start <= 0.02, curves          # ... and nothing from shuffled ones
    assert curves["grpo"][-1][1] - curves["shuffled"][-1][1] >= 0.05, curves
    records = [r for r in read_metrics(tmp_path / "grpo") if "reward" in r]
    for key in ("reward", "reward/accuracy", "reward/format", "accuracy", "zero_spread_frac", "clip_frac_low",
                "clip_frac_high", "entropy", "response_len", "logprob_gap_mean", "logprob_gap_max"):
        assert all(key in r for r in records), key
    assert max(r["logprob_gap_max"] for r in records) < 1e-4          # routing replay: rollout == training


def grpo_first_update(rank, world_size, overrides):
    cfg = load_config("configs/grpo-tiny.yaml", overrides).validate(world_size)
    cfg.validate_generation_layout(world_size, cfg.grpo.prompts_per_step)
    tokenizer = prepare_data(cfg.data, cfg.model.vocab_size).tokenizer
    trainer = GRPOTrainer(cfg, tokenizer, build_mesh(cfg.parallel))
    record = trainer.train_step()
    trainer.step = 1
    trainer.save()
    return record


def test_four_ranks_first_update_equals_single_process(sft_checkpoint, tmp_path, demo_run):
    init, _ = sft_checkpoint
    common = COMMON + [f"data.cache_dir={demo_run.cache_dir}", f"grpo.init={init}", "grpo.prompts_per_step=4",
                      "grpo.group_size=4", "grpo.micro_batch=4", "grpo.eval_problems=4", "grpo.kl_beta=0.05",
                      "grpo.updates_per_batch=1", "train.lr=1e-3", "train.eps=1e-2"]
    # Adam's first step is lr * g / (|g| + eps): with the default eps it is +-lr for every gradient
    # entry, so the rounding-level sign of a near-zero gradient decides it. A large eps makes the
    # step proportional to the gradient, and the weights then agree to fp32 rounding.
    single = grpo_first_update(0, 1, common + [f"checkpoint.dir={tmp_path / 'single'}"])
    layouts = {"dp2_ep2": ["parallel.ep=2"], "dp2_tp2": ["parallel.tp=2"]}
    for name, layout in layouts.items():
        records = run_ranks(grpo_first_update, 4, (common + layout + [f"checkpoint.dir={tmp_path / name}"],), timeout=600)
        for key in ("reward", "response_len", "zero_spread_frac", "kl", "entropy", "loss"):
            assert records[0][key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), (name, key)
        assert records[0]["logprob_gap_max"] < 1e-5 and single["logprob_gap_max"] < 1e-5
        ours, theirs = CheckpointReader(str(tmp_path / "single" / "step_00000001")), \
            CheckpointReader(str(tmp_path / name / "step_00000001"))
        names = ours.names("model.")
        assert names == theirs.names("model.")
        for tensor in names:
            a, b = ours.read(tensor), theirs.read(tensor)
            assert_close(b, a, f"{name}: {tensor}")
        initial = CheckpointReader(latest_checkpoint(init))
        moved = sum(not torch.equal(ours.read(t), initial.read(t)) for t in names)
        assert moved > len(names) // 2                                  # the update changed the weights
    # The GRPO checkpoint converts to HuggingFace like a pretraining one, and back without a change.
    to_hf(str(tmp_path / "single"), str(tmp_path / "hf"), dtype=torch.float32)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"), dequant_dtype=torch.float32)
    back = DeepSeekV3(load_config("configs/grpo-tiny.yaml", COMMON).model)
    load_model_weights(str(tmp_path / "back"), back)
    state, grpo = back.state_dict(), CheckpointReader(str(tmp_path / "single" / "step_00000001"))
    for tensor in grpo.names("model."):
        assert torch.equal(state[tensor.removeprefix("model.")], grpo.read(tensor)), tensor
