"""The single-process pretraining loop: exact resume, metrics, non-finite steps, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megads import pretrain
from megads.config import load_config
from megads.data import prepare_data
from megads.train.trainer import NonFiniteError, Trainer

SMALL = ["parallel.tp=1", "model.hidden_size=64", "model.num_layers=3", "model.intermediate_size=128", "model.moe_intermediate_size=32",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2",
         "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1", "data.synthetic_docs=2000",
         "data.synthetic_valid_docs=100", "train.warmup_steps=2"]


def small_config(run_dir, cache, *extra):
    return load_config("configs/tiny.yaml", SMALL + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *extra]
                       ).validate(world_size=1)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_bitwise_exact(tmp_path, data_cache):
    # eval_interval=3: the split run's end-of-run evaluation at step 3 is a regular one too
    whole = small_config(tmp_path / "whole", data_cache, "train.steps=6", "checkpoint.interval=0", "train.eval_interval=3")
    data = prepare_data(whole.data, whole.model.vocab_size)
    uninterrupted = Trainer(whole, data)
    uninterrupted.fit()

    first = small_config(tmp_path / "split", data_cache, "train.steps=3", "train.eval_interval=3")
    Trainer(first, data).fit()
    second = small_config(tmp_path / "split", data_cache, "train.steps=6", "train.eval_interval=3")
    resumed = Trainer(second, data)
    resumed.fit()

    assert resumed.step == 6
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a, opt_b = uninterrupted.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in opt_a:
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[key][field], opt_b[key][field])
    keys = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "max_load_ratio", "valid_loss")
    strip = lambda rows: [{k: r.get(k) for k in ("step",) + keys} for r in rows]
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "split"))
    biases = [m.gate.e_score_correction_bias for m in resumed.model.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)          # the bias update ran and was restored


def test_metrics_and_tensorboard(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "train.steps=2", "model.mtp_depth=1")
    Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size)).fit()
    rows = read_metrics(tmp_path)
    assert rows[0] == {"step": 0, "valid_loss": rows[0]["valid_loss"]}
    required = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "max_load_ratio"}
    for row in rows[1:]:
        assert required <= row.keys()
        assert row["max_load_ratio"] >= 1.0 and row["mtp_loss"] > 0 and row["balance_loss"] > 0
        assert row["loss"] == pytest.approx(row["lm_loss"] + 0.3 * row["mtp_loss"] + row["balance_loss"], rel=1e-6)
    assert "valid_loss" in rows[2]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))

    # tools/plot_metrics.py draws the run's curves (a PNG of the panels' size).
    picture = tmp_path / "curves.png"
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(picture), f"{tmp_path}:tiny"], check=True, timeout=120)
    with open(picture, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") > int.from_bytes(header[20:24], "big") > 300    # 3 x 2 panels


def _poison(trainer, steps):
    """Make the first layer's output NaN while trainer.step is in `steps`."""
    layer = trainer.model.layers["0"]
    layer.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step in steps and m.training else out)


def test_nonfinite_step_is_skipped(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "train.steps=3", "train.eval_interval=0", "checkpoint.save_at_end=false")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    _poison(trainer, {1})
    before = {}

    def snapshot(step):
        if trainer.step == 1:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
    original = trainer.train_step
    trainer.train_step = lambda batches: (snapshot(trainer.step), original(batches))[1]
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert trainer.step == 3 and trainer.nonfinite_streak == 0


def test_skipped_step_leaves_weights_unchanged(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "train.steps=1")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    _poison(trainer, {0})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train_step(trainer.train_batches.next_step())
    assert result.skipped and result.bad_tensor == "loss"
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_consecutive_nonfinite_steps_stop_training(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "train.steps=10", "train.max_nonfinite_steps=2")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    weight = trainer.model.layers["1"].self_attn.o_proj.weight
    weight.register_hook(lambda g: g * float("inf"))       # finite loss, non-finite gradient
    with pytest.raises(NonFiniteError, match=r"step 2: 2 consecutive .* layers\.1\.self_attn\.o_proj\.weight\.grad"):
        trainer.fit()


@pytest.mark.parametrize("override, setting", [
    ("model.hiddn_size=64", "model.hiddn_size"),
    ("model.n_routed_experts=6", "model.n_routed_experts"),
    ("data.source=indexed data.train_path=/missing/train data.valid_path=/missing/valid", "data.train_path"),
])
def test_bad_input_writes_nothing(tmp_path, capsys, override, setting):
    run_dir = tmp_path / "run"
    code = pretrain.main(["configs/tiny.yaml", "parallel.tp=1", f"train.run_dir={run_dir}", *override.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and setting in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_demo_learns(tmp_path):
    """The README's demo command (4 ranks, DP=2 x TP=2 with EP=2), end to end through the launcher:
    the held-out loss halves, and only rank 0 writes metrics."""
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "launch/run.py", "--nproc-per-node", "4", "pretrain", "configs/tiny.yaml",
                           "parallel.ep=2", f"train.run_dir={run_dir}",
                           f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {run_dir}" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 201))      # one line per step, one writer
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert valid[-1] <= 0.5 * valid[0], valid
    assert os.path.exists(run_dir / "checkpoints" / "latest")
    assert all(r["max_nodes_per_token"] <= 2 and r["tokens_off_rank"] > 0 for r in rows if "loss" in r)
