"""Parity of pipeline parallelism (1F1B, DualPipe, DualPipeV; with EP, MTP, DP and TP) with the
single-process run: 3 optimizer steps in fp32 on CPU ranks, comparing the validation loss (a
forward-only pass through the pipeline), the per-step losses and gradient norms, the first step's gradients of every parameter (after the pipeline's mirror sum
and the DP mean) and every updated weight, gathered from all stages. DualPipe's mirrored copies
are compared too (they must equal the single-process tensor, hence each other).
The tolerances and learning-rate choice follow tests/test_parallel_core.py.
"""
import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from test_parallel_core import STEPS, assert_close, make_config, steps_with_first_gradients, train, unshard
from megads.data import prepare_data
from megads.parallel.mesh import build_mesh
from megads.train.trainer import Trainer

PIPE = ["model.num_layers=4", "train.micro_batch=1"]     # 8 micro-batches per step on one process


def _gathered(plan, model, tensors: dict) -> dict:
    """name -> full tensor (TP/EP shards gathered), with ' (mirror)' appended for mirrored copies."""
    held = model.state_dict(keep_vars=True)
    out = {}
    for name, t in tensors.items():
        key = name + (" (mirror)" if plan.is_mirror(held[name]) else "")
        out[key] = unshard(t, plan.of(held[name]), plan).detach().clone()
    return out


def _dp_mean_copy(model, plan) -> dict:
    """The step's gradients as the optimizer will see them (mean over DP), without touching .grad."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        group = plan.mesh.group(plan.of(p).grad_group)
        if group is not None:
            dist.all_reduce(g, group=group)
        grads[name] = g / plan.mesh.dp
    return grads


def _rank_main(rank, world_size, cache, overrides):
    cfg = make_config(cache, PIPE + overrides, world_size)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    mesh = build_mesh(cfg.parallel)
    trainer = Trainer(cfg, data, mesh)
    valid = trainer.evaluate()
    results, captured = steps_with_first_gradients(trainer, STEPS, lambda: _dp_mean_copy(trainer.model, trainer.plan))
    grads = _gathered(trainer.plan, trainer.model, captured)
    weights = _gathered(trainer.plan, trainer.model, trainer.model.state_dict())
    keep = mesh.dp_rank == 0 and mesh.tp_rank == 0
    return {"deferred": trainer.pipeline.store.deferred, "valid": valid, "losses": [(s.loss, s.lm_loss, s.mtp_loss, s.balance_loss) for s in results],
            "grad_norms": [s.grad_norm for s in results], "skipped": [s.skipped for s in results],
            "grads": grads if keep else {}, "weights": weights if keep else {}}


@pytest.fixture(scope="module")
def reference(data_cache):
    cfg = make_config(data_cache, PIPE, 1)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    valid = Trainer(cfg, data, build_mesh(cfg.parallel)).evaluate()
    return {"valid": valid, **train(cfg, data, build_mesh(cfg.parallel))}


def _merge(results, key):
    merged = {}
    for r in results:
        merged.update(r[key])
    return merged


@pytest.mark.parametrize("world_size, overrides", [
    (2, ["parallel.pp=2", "parallel.pipeline_schedule=1f1b"]),
    (4, ["parallel.pp=4", "parallel.pipeline_schedule=1f1b"]),
    (2, ["parallel.pp=2", "parallel.pipeline_schedule=1f1b", "parallel.pipeline_layout=Et|tttLm"]),
    (2, ["parallel.pp=2", "parallel.pipeline_schedule=dualpipe"]),
    (4, ["parallel.pp=4", "parallel.pipeline_schedule=dualpipe"]),
    (2, ["parallel.pp=2", "parallel.pipeline_schedule=dualpipev"]),
    (4, ["parallel.pp=2", "parallel.pipeline_schedule=dualpipe", "parallel.ep=2", "parallel.zero_stage=1"]),
    (8, ["parallel.pp=2", "parallel.tp=2", "parallel.ep=2", "parallel.pipeline_schedule=dualpipe",
         "parallel.zero_stage=1"]),
], ids=["1f1b-pp2", "1f1b-pp4", "1f1b-pp2-uneven-layout", "dualpipe-pp2", "dualpipe-pp4", "dualpipev-pp2", "dualpipe-pp2-ep2-dp2-mtp",
        "dualpipe-pp2-dp2-tp2-ep2"])
def test_pipeline_parity_with_single_process(reference, data_cache, world_size, overrides):
    results = run_ranks(_rank_main, world_size, args=(data_cache, overrides), timeout=900)
    got = results[0]
    for r in results[1:]:
        assert r["losses"] == got["losses"], "ranks disagree on the logged global-batch loss"
    assert got["skipped"] == [False] * STEPS
    if "parallel.pipeline_schedule=1f1b" not in overrides:      # the dual schedules defer weight gradients to W
        assert all(r["deferred"] > 0 for r in results)
    assert [r["valid"] for r in results] == [got["valid"]] * world_size
    assert got["valid"] == pytest.approx(reference["valid"], rel=1e-5), "validation loss through the pipeline"
    for step, (a, b) in enumerate(zip(got["losses"], reference["losses"])):
        assert_close(torch.tensor(a), torch.tensor(b), f"losses of step {step + 1}")
    assert_close(torch.tensor(got["grad_norms"]), torch.tensor(reference["grad_norms"]), "gradient norms")
    for key, what in (("grads", "gradient"), ("weights", f"weight after {STEPS} steps")):
        merged = _merge(results, key)
        homes = sorted(name for r in results for name in r[key] if not name.endswith(" (mirror)"))
        assert homes == sorted(reference[key]), f"{key}: not every tensor has exactly one home copy"
        for name, value in merged.items():
            assert_close(value, reference[key][name.removesuffix(" (mirror)")], f"{what} of {name}")
