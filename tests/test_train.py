"""The single-process pretraining loop: exact resume, metrics, non-finite steps, bad input."""
import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megads import pretrain
from megads.checkpoint import latest_checkpoint
from megads.config import load_config
from megads.data import prepare_data
from megads.train.loop import NonFiniteError
from megads.train.trainer import Trainer

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


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_is_bitwise_exact(tmp_path, data_cache, dtype):
    """bf16: train.precision=main_grads, whose bf16 weight copies are made anew from the loaded weights."""
    # eval_interval=3: the split run's end-of-run evaluation at step 3 is a regular one too
    whole = small_config(tmp_path / "whole", data_cache, "train.steps=6", "checkpoint.interval=0", "train.eval_interval=3",
                         f"train.dtype={dtype}")
    data = prepare_data(whole.data, whole.model.vocab_size)
    uninterrupted = Trainer(whole, data)
    uninterrupted.fit()

    first = small_config(tmp_path / "split", data_cache, "train.steps=3", "train.eval_interval=3", f"train.dtype={dtype}")
    Trainer(first, data).fit()
    second = small_config(tmp_path / "split", data_cache, "train.steps=6", "train.eval_interval=3", f"train.dtype={dtype}")
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
    load_keys = sorted(k for k in rows[1] if k.startswith("load/"))
    assert load_keys and all(k.endswith(("/max_mean", "/min_mean")) for k in load_keys)
    for row in rows[1:]:
        for key in load_keys:
            assert (row[key] >= 1.0) if key.endswith("max_mean") else (0.0 <= row[key] <= 1.0), (key, row[key])

    # TensorBoard holds the same scalars, and a histogram of every MoE layer's expert load.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for key in required - {"step"} | {"valid_loss", *load_keys}:
        assert f"train/{key}" in scalars, key
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows[1:]])
    layers = {k.split("/")[1] for k in load_keys}
    m = cfg.model
    assert len(layers) == m.num_layers - m.first_k_dense + m.mtp_depth            # every MoE layer, MTP's too
    assert {f"train/load/{layer}" for layer in layers} <= set(events.Tags()["histograms"])

    # tools/plot_metrics.py draws the run's curves (a PNG of the panels' size).
    picture = tmp_path / "curves.png"
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(picture), f"{tmp_path}:tiny"], check=True, timeout=120)
    with open(picture, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") > int.from_bytes(header[20:24], "big") > 300    # 3 x 2 panels


def poison_loss(trainer, steps) -> str:
    """Make the first layer's output NaN while trainer.step is in `steps`; returns the tensor reported."""
    layer = trainer.model.layers["0"]
    layer.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step in steps and m.training else out)
    return "loss"


def poison_gradients(trainer, steps) -> str:
    """Make two weights' gradients infinite while trainer.step is in `steps` (the loss stays finite);
    returns the first of them in parameter order, the one reported."""
    for layer in ("2", "1"):
        weight = trainer.model.layers[layer].self_attn.o_proj.weight
        weight.register_hook(lambda g: g * float("inf") if trainer.step in steps else g)
    return "layers.1.self_attn.o_proj.weight.grad"


@pytest.mark.parametrize("poison", [poison_loss, poison_gradients])
def test_nonfinite_step_is_skipped(tmp_path, data_cache, caplog, poison):
    """A non-finite loss, or a finite loss with non-finite gradients: the step changes no weight or
    router bias, and the warning names the first non-finite tensor."""
    cfg = small_config(tmp_path, data_cache, "train.steps=3", "train.eval_interval=0", "checkpoint.save_at_end=false")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    bad_tensor = poison(trainer, {1})
    before = []                                     # the model's state before each step
    train_step = trainer.train_step

    def recording_step(batches):
        before.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return train_step(batches)
    trainer.train_step = recording_step
    with caplog.at_level(logging.WARNING, logger="megads"):
        trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert math.isfinite(rows[1]["loss"]) == (bad_tensor != "loss") and not math.isfinite(rows[1]["grad_norm"])
    assert f"step 2: non-finite {bad_tensor} " in caplog.text
    assert trainer.step == 3 and trainer.nonfinite_streak == 0
    first, skipped, last = before
    for k, v in skipped.items():
        assert torch.equal(last[k], v), k                               # the skipped step changed nothing
    assert any(not torch.equal(first[k], v) for k, v in skipped.items())  # the steps around it did
    assert any(not torch.equal(last[k], v) for k, v in trainer.model.state_dict().items())


def test_consecutive_nonfinite_steps_stop_training(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "train.steps=10", "train.max_nonfinite_steps=2")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size))
    bad_tensor = poison_gradients(trainer, range(10))
    with pytest.raises(NonFiniteError, match=rf"step 2: 2 consecutive .* {re.escape(bad_tensor)}"):
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


def test_single_process_cli_run(tmp_path, data_cache, capsys):
    """`python -m megads.pretrain configs/tiny.yaml parallel.tp=1 ...` alone, without a launcher."""
    run_dir = tmp_path / "run"
    code = pretrain.main(["configs/tiny.yaml", *SMALL, "parallel.ep=1", "train.steps=2", f"train.run_dir={run_dir}",
                          f"data.cache_dir={data_cache}"])
    assert code == 0
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    checkpoints = run_dir / "checkpoints"
    assert latest_checkpoint(str(checkpoints)) == str(checkpoints / "step_00000002")


def test_layout_error_at_launch(tmp_path, capsys, monkeypatch):
    """Rank 0 of a 6-rank torchrun job asking for TP=2 x PP=2: refused before any process group starts."""
    torchrun = {"WORLD_SIZE": "6", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "6", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    code = pretrain.main(["configs/tiny.yaml", "parallel.tp=2", "parallel.pp=2", f"train.run_dir={run_dir}",
                          f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "world size 6 " in err and "parallel.tp * parallel.pp = 2 * 2 = 4" in err
    assert not dist.is_initialized()
    assert os.listdir(tmp_path) == []


def test_demo_learns(demo_run):
    """The README's demo command (4 ranks, DP=2 x TP=2 with EP=2), end to end through the launcher:
    the held-out loss halves, and only rank 0 writes metrics."""
    proc, run_dir = demo_run.proc, demo_run.run_dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {run_dir}" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 201))      # one line per step, one writer
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert valid[-1] <= 0.5 * valid[0], valid
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
    assert all(r["max_nodes_per_token"] <= 2 and r["tokens_off_rank"] > 0 for r in rows if "loss" in r)
