"""Layout-free checkpoints: resharding across layouts with the optimizer state, weights-only
loading, atomic writes and keep-last, and clear errors for damaged checkpoints.

The resharding case trains 2 steps under DP=2 x TP=2 (ZeRO-2), saves, and takes step 3 three
ways: under the same layout, under PP=2 (DualPipe) x EP=2 x DP=2 (ZeRO-1) and on one process.
Step 3's loss and every weight and Adam moment after it (saved again by each run, so saving
under PP and EP is checked too) must agree within fp32 rounding (lr and eps as in the parity
tests, see tests/test_parallel_core.py). Every run also resumes its own final checkpoint under
its own layout and must get its state back bit for bit (exact resume), and under PP=2 (DualPipe)
x EP=2 a resumed run must continue exactly as the uninterrupted one.

Damaged or mismatched checkpoints (missing or truncated files, missing pieces, another model
config) fail to load with an error that names the tensor.
"""
import dataclasses
import json
import os
import re

import pytest
import torch

from distributed import run_ranks
from megads.checkpoint import CheckpointError, CheckpointReader, latest_checkpoint, load_model_weights, save_checkpoint
from megads.checkpoint.format import index_digest
from megads.checkpoint.optimizer import adam_step, moments
from megads.config import load_config
from megads.data import prepare_data
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.builder import build_model
from megads.parallel.data import LocalOptimizer
from megads.parallel.mesh import Mesh, build_mesh
from megads.train.optim import build_optimizer
from megads.train.trainer import Trainer

SMALL = ["parallel.tp=1", "model.hidden_size=64", "model.num_layers=3", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.mtp_depth=1", "train.seq_len=32",
         "train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=1", "train.lr=2e-4", "train.min_lr=2e-5",
         "train.eps=1e-6", "train.eval_interval=0", "train.log_interval=1", "data.synthetic_docs=2000",
         "data.synthetic_valid_docs=100", "train.seq_aux_alpha=0.01", "train.bias_update_speed=0.01", "train.steps=3"]

# DualPipe needs >= 2 * pp micro-batches per rank: micro_batch 1 (the global batch is unchanged).
PP2_EP2_DUALPIPE = ["parallel.pp=2", "parallel.ep=2", "parallel.pipeline_schedule=dualpipe", "parallel.zero_stage=1",
                    "train.micro_batch=1"]
MEASURED = ("tokens_per_s", "mfu", "memory_gib")     # speed and memory readings: not part of the computation


def make_config(cache, run_dir, world_size, *overrides):
    return load_config("configs/tiny.yaml", SMALL + [f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *overrides]
                       ).validate(world_size)


def _fit(rank, world_size, cache, run_dir, overrides):
    """Train to train.steps (saving at the end), then resume a fresh trainer of the same layout
    from that checkpoint: it must hold bit for bit the state the first one ended with."""
    cfg = make_config(cache, run_dir, world_size, *overrides)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    mesh = build_mesh(cfg.parallel)
    trainer = Trainer(cfg, data, mesh)
    trainer.fit()
    resumed = Trainer(make_config(cache, run_dir, world_size, *overrides, "checkpoint.resume=auto"), data, mesh)
    resumed.maybe_resume()
    assert (resumed.step, resumed.train_batches.consumed_samples) == (trainer.step, trainer.train_batches.consumed_samples)
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(moments(trainer.stepper, trainer.model), moments(resumed.stepper, resumed.model)):
        assert all(torch.equal(a[m], b[m]) for m in a), name
    assert adam_step(trainer.stepper) == adam_step(resumed.stepper) == trainer.step
    return trainer.step


def step_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_close(actual, expected, what, rel=1e-5):
    scale = max(expected.abs().max().item(), 1e-12)
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"{what}: max abs difference {diff:.3e} > {rel} x {scale:.3e}"


def assert_same_tensors(path, reference_path, rel=1e-5):
    got, want = CheckpointReader(path), CheckpointReader(reference_path)
    assert sorted(got.tensors) == sorted(want.tensors)
    assert any(n.startswith("optimizer.exp_avg_sq.") for n in want.tensors)
    for name in want.tensors:
        assert_close(got.read(name), want.read(name), f"{name} in {path}")


def test_reshard_dp2xtp2_to_pp2xep2_dualpipe_and_single_process(tmp_path, data_cache):
    source = str(tmp_path / "dp2xtp2")
    assert run_ranks(_fit, 4, args=(data_cache, source, ["parallel.tp=2", "parallel.zero_stage=2",
                                                          "checkpoint.interval=2"]), timeout=900) == [3] * 4
    saved = os.path.join(source, "checkpoints", "step_00000002")
    assert CheckpointReader(saved).metadata["layout"] == {"dp": 2, "pp": 1, "tp": 2, "ep": 1}
    resume = [f"checkpoint.resume={saved}"]
    targets = {"pp2xep2-dualpipe": (4, PP2_EP2_DUALPIPE), "single": (1, [])}
    for name, (world_size, overrides) in targets.items():
        run_dir = str(tmp_path / name)
        if world_size == 1:
            _fit(0, 1, data_cache, run_dir, overrides + resume)
        else:
            assert run_ranks(_fit, world_size, args=(data_cache, run_dir, overrides + resume), timeout=900) == [3] * 4
        assert list(step_losses(run_dir)) == [3], "the resumed run should take step 3 only"
        assert_close(torch.tensor(step_losses(run_dir)[3]), torch.tensor(step_losses(source)[3]), f"{name}: loss of step 3")
        assert_same_tensors(os.path.join(run_dir, "checkpoints", "step_00000003"),
                            os.path.join(source, "checkpoints", "step_00000003"))

    # Weights only, into a plain single-process model, from the DP=2 x TP=2 checkpoint.
    cfg = make_config(data_cache, source, 1)
    model = DeepSeekV3(cfg.model)
    info = load_model_weights(os.path.join(source, "checkpoints"), model)
    assert info["step"] == 3
    reader = CheckpointReader(os.path.join(source, "checkpoints", "step_00000003"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reader.read("model." + name)), name
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def _continue(rank, world_size, cache, root, steps):
    """Train 2 x `steps` steps in one run ("whole") and in two ("split": a fresh trainer resumes the
    first run's checkpoint); returns the names of this rank's tensors that differ at the end."""
    data, states = None, {}
    for name, plan in (("whole", [(2 * steps, "none")]),
                       ("split", [(steps, "none"), (2 * steps, f"{root}/split/checkpoints/step_{steps:08d}")])):
        for total, resume in plan:
            cfg = make_config(cache, f"{root}/{name}", world_size, *PP2_EP2_DUALPIPE, f"train.steps={total}",
                              f"checkpoint.resume={resume}")
            data = data or prepare_data(cfg.data, cfg.model.vocab_size)
            trainer = Trainer(cfg, data, build_mesh(cfg.parallel))
            trainer.fit()
        states[name] = trainer.model.state_dict()
    return [k for k, v in states["whole"].items() if not torch.equal(v, states["split"][k])]


def test_pp2xep2_dualpipe_resume_continues_bitwise(tmp_path, data_cache):
    """Exact resume under PP x EP: 2 + 2 steps with a resume in between equal 4 uninterrupted steps
    bit for bit (weights on every rank, every tensor of the final checkpoints, the metrics)."""
    assert run_ranks(_continue, 4, args=(data_cache, str(tmp_path), 2), timeout=900) == [[]] * 4
    metrics = {name: [{k: v for k, v in json.loads(line).items() if k not in MEASURED}
                      for line in open(tmp_path / name / "metrics.jsonl")] for name in ("whole", "split")}
    assert [r["step"] for r in metrics["split"]] == [1, 2, 3, 4]
    assert metrics["whole"] == metrics["split"]
    whole, split = (CheckpointReader(str(tmp_path / name / "checkpoints" / "step_00000004"))
                    for name in ("whole", "split"))
    assert whole.metadata["layout"] == {"dp": 2, "pp": 2, "tp": 1, "ep": 2}
    assert sorted(whole.tensors) == sorted(split.tensors)
    for name in whole.tensors:
        assert torch.equal(whole.read(name), split.read(name)), name


# ----------------------------------------------------------------------------- single process

TINY = ["parallel.tp=1", "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64", "model.moe_intermediate_size=16",
        "model.q_lora_rank=0", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8",
        "model.v_head_dim=8", "model.vocab_size=64", "model.num_heads=2"]


def tiny_model(*overrides, mesh=None):
    """The tiny model (seed 0) on `mesh` (one process by default) and its local optimizer, which
    holds the model's parallel plan."""
    cfg = load_config("configs/tiny.yaml", TINY + ["train.seed=0", *overrides]).validate(1)
    built = build_model(cfg, mesh or Mesh(), torch.device("cpu"))
    optimizer = build_optimizer(built.model, built.plan, cfg.train, torch.device("cpu"))
    return built.model, LocalOptimizer(built.model, optimizer, built.plan, 1.0)


def save_tiny(ckpt_dir, step=1, keep_last=2):
    model, stepper = tiny_model()
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:], 0.3).loss.backward()
    stepper.step()
    return save_checkpoint(str(ckpt_dir), step, model, stepper, stepper.plan, {"step": step}, keep_last,
                           {"model_config": dataclasses.asdict(model.cfg)})


def test_keep_last_latest_and_exact_round_trip(tmp_path):
    paths = [save_tiny(tmp_path, step) for step in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(str(tmp_path)) == paths[-1]
    os.makedirs(tmp_path / "step_00000004.tmp")            # an interrupted save is never picked up
    assert latest_checkpoint(str(tmp_path)) == paths[-1]
    model, stepper = tiny_model()
    source, _ = tiny_model()
    load_model_weights(paths[-1], source)
    from megads.checkpoint import load_checkpoint
    assert load_checkpoint(str(tmp_path), model, stepper, stepper.plan) == {"step": 3}
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    reader = CheckpointReader(paths[-1])
    for name, p in model.named_parameters():
        assert torch.equal(stepper.optimizer.state[p]["exp_avg_sq"], reader.read(f"optimizer.exp_avg_sq.{name}")), name
        assert int(stepper.optimizer.state[p]["step"]) == 1


def _piece_file_of(path, tensor):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)["tensors"][tensor]["pieces"][0]["file"]


def _first_held(path, file):
    """How errors name the tensors of `file` (the tiny model's only one): the first three in index
    order, model.embed_tokens.weight first, and a count of the rest."""
    with open(os.path.join(path, "index.json")) as f:
        tensors = json.load(f)["tensors"]
    held = [name for name, entry in tensors.items() if any(p["file"] == file for p in entry["pieces"])]
    assert held[0] == "model.embed_tokens.weight" and len(held) > 3
    return re.escape(f"holds tensor {', '.join(held[:3])} and {len(held) - 3} more")


def test_missing_file_names_the_tensor(tmp_path):
    path = save_tiny(tmp_path)
    file = _piece_file_of(path, "model.embed_tokens.weight")
    os.remove(os.path.join(path, file))
    with pytest.raises(CheckpointError, match=re.escape(f"missing {file}, which ") + _first_held(path, file)):
        load_model_weights(path, tiny_model()[0])


def test_truncated_file_names_the_tensor(tmp_path):
    path = save_tiny(tmp_path)
    file = _piece_file_of(path, "model.lm_head.weight")
    with open(os.path.join(path, file), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, file)) // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{file} is truncated") + ".*; it " + _first_held(path, file)):
        load_model_weights(path, tiny_model()[0])


def test_wrong_shape_names_the_tensor(tmp_path):
    path = save_tiny(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight has shape \[64, 32\] in checkpoint .* "
                                              r"but \[128, 32\] in this model; the checkpoint's model config differs: "
                                              r"vocab_size=64 \(this model: 128\);"):
        load_model_weights(path, tiny_model("model.vocab_size=128")[0])


def test_missing_piece_names_the_tensor(tmp_path):
    path = save_tiny(tmp_path)
    index_path = os.path.join(path, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["tensors"]["model.layers.1.mlp.experts.up_proj"]["pieces"] = []
    index["index_sha256"] = index_digest(index)          # as a faulty writer would have signed it
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"pieces of tensor model\.layers\.1\.mlp\.experts\.up_proj in index\.json "
                                              r"do not tile its shape \[\d+, \d+, \d+\]: no piece covers offset "
                                              r"\[0, 0, 0\]"):
        load_model_weights(path, tiny_model()[0])


# The checkpoint holds 2 layers (layer 1: MoE, 15 tensors) and MTP depth 1 (19 tensors), no query compression.
MISMATCHES = {
    "fewer layers": ("model.num_layers=1", "holds tensor model.layers.1.input_layernorm.weight and 14 more, which this "
                     "model lacks", "num_layers=2 (this model: 1)"),
    "no mtp": ("model.mtp_depth=0", "holds tensor model.mtp.0.eh_proj.weight and 18 more, which this model lacks",
               "mtp_depth=1 (this model: 0)"),
    "more layers": ("model.num_layers=3", "has no tensor model.layers.2.input_layernorm.weight and 14 more, which this "
                    "model needs", "num_layers=2 (this model: 3)"),
    "query compression": ("model.q_lora_rank=16", "has no tensor model.layers.0.self_attn.q_a_proj.weight and 8 more, "
                          "which this model needs", "q_lora_rank=0 (this model: 16)"),
}


@pytest.mark.parametrize("override, tensors, difference", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_mismatched_model_config_names_the_tensor(tmp_path, override, tensors, difference):
    path = save_tiny(tmp_path)
    message = f"{tensors}; the checkpoint's model config differs: {difference};"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model_weights(path, tiny_model(override)[0])
