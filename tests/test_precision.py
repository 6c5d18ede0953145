"""`train.precision=main_grads` (model/precision.py): bf16 copies of the fp32 weights made once per
optimizer step, fp32 weight gradients written by the GEMMs.

- the GEMMs' fp32 gradients equal a float64 reference on the same bf16 operands (fp32 rounding),
  accumulated in place over micro-batches, or handed to autograd where hooks must see them;
- bf16 training with it tracks the autocast reference (the user's path before it) to bf16
  rounding over several steps, single-process and on gloo ranks under TP with sequence
  parallelism (hook-reduced weights), DeepSpeed ZeRO and all-reduce data parallelism;
- fp32 runs are untouched (the fp32 parity suite runs them).
"""
import pytest
import torch

from distributed import run_ranks
from megads.config import load_config
from megads.data import prepare_data
from megads.model.layers import Linear, LinearFunction
from megads.model.moe import GroupedExperts, GroupedLinearFunction
from megads.model.precision import MainGradGemm, MainGradGroupedGemm
from megads.parallel.builder import build_model
from megads.parallel.mesh import Mesh, build_mesh, layout_mesh
from megads.train.trainer import Trainer

STEPS = 3


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("in_place", [True, False])
def test_linear_weight_gradient_is_fp32_and_accumulates(in_place):
    """Three micro-batches: the fp32 gradient is the float64 sum of dy^T x over them (fp32 rounding),
    added into .grad by the GEMM after the first (autograd, and its hooks, see the first only), or
    returned to autograd each time."""
    param = torch.nn.Parameter(bf16(24, 40, seed=0).float())
    copy = param.detach().to(torch.bfloat16)
    xs, dys = [bf16(3, 5, 40, seed=1 + i) for i in range(3)], [bf16(3, 5, 24, seed=10 + i) for i in range(3)]
    hook_calls = []
    param.register_hook(lambda grad: hook_calls.append(grad))       # sees each gradient autograd gets
    for x, dy in zip(xs, dys):
        x.requires_grad_(True)
        y = LinearFunction.apply(x, param, copy, param.grad if in_place else None)
        assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x, copy))
        y.backward(dy)
        assert torch.equal(x.grad, (dy.float() @ copy.float()).to(torch.bfloat16))
    expected = sum(dy.double().flatten(0, 1).t() @ x.double().flatten(0, 1) for x, dy in zip(xs, dys))
    assert param.grad.dtype == torch.float32
    assert (param.grad.double() - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert sum(g is not None for g in hook_calls) == (1 if in_place else 3)


def test_grouped_weight_gradient_is_fp32_and_accumulates():
    param = torch.nn.Parameter(bf16(4, 16, 32, seed=0).float())
    copy = param.detach().to(torch.bfloat16)
    counts = torch.tensor([3, 0, 5, 4])
    expected = torch.zeros(4, 16, 32, dtype=torch.float64)
    for mb in range(3):
        x, dy = bf16(12, 32, seed=1 + mb), bf16(12, 16, seed=10 + mb)
        y = GroupedLinearFunction.apply(x, param, copy, counts, True, param.grad)
        rows = x.float().split(counts.tolist())
        assert torch.allclose(y.float(), torch.cat([r @ w.t() for r, w in zip(rows, copy.float())]), rtol=1e-2, atol=1e-2)
        y.backward(dy)
        for e, (xe, ge) in enumerate(zip(x.double().split(counts.tolist()), dy.double().split(counts.tolist()))):
            expected[e] += ge.t() @ xe
    assert param.grad.dtype == torch.float32
    # the grouped GEMM writes bf16 (its only output dtype): each micro-batch's product is rounded once
    assert (param.grad.double() - expected).abs().max() <= 3 * 2 ** -8 * expected.abs().max()


def config(data_cache, run_dir, precision, *extra):
    return load_config("configs/tiny.yaml", [
        "parallel.tp=1", f"train.steps={STEPS}", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=64",
        "train.warmup_steps=2", "train.eval_interval=0", "checkpoint.save_at_end=false", "checkpoint.interval=0",
        "data.synthetic_docs=2000", "data.synthetic_valid_docs=100", f"data.cache_dir={data_cache}",
        f"train.run_dir={run_dir}", "train.dtype=bf16", f"train.precision={precision}", *extra])


def train_bf16(cfg, data, mesh=None) -> dict:
    trainer = Trainer(cfg, data, mesh)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    copies = trainer.built.weight_copies
    losses = []
    for _ in range(STEPS):
        result = trainer.train_step(trainer.train_batches.next_step())
        trainer.step += 1
        assert not result.skipped
        losses.append(result.loss)
        if copies is not None:           # the bf16 copies follow every update
            assert all(torch.equal(copy, w.to(torch.bfloat16)) for w, copy in copies.copies.items())
    return {"losses": losses, "start": start, "applied": trainer.built.applied,
            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "gemms": {n: repr(m.strategy.gemm) for n, m in trainer.model.named_modules()
                      if isinstance(m, (Linear, GroupedExperts))}}


def assert_tracks_autocast(main, reference):
    """Losses within bf16 rounding; every weight's distance from the autocast run small against
    how far the 3 updates moved it (Adam turns bf16-level gradient differences into per-element
    update differences; routing flips on the experts: a few percent of the update, where a lost
    or doubled gradient moves a weight by the whole update)."""
    for a, b in zip(main["losses"], reference["losses"]):
        assert abs(a - b) <= 2e-3 * abs(b), (main["losses"], reference["losses"])
    for name, w in reference["weights"].items():
        moved = (w - reference["start"][name]).norm()
        assert (main["weights"][name] - w).norm() <= 0.2 * moved, name


def test_bf16_training_tracks_autocast(tmp_path, data_cache):
    cfg = config(data_cache, tmp_path / "a", "autocast").validate(1)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    reference = train_bf16(cfg, data)
    main = train_bf16(config(data_cache, tmp_path / "m", "main_grads").validate(1), data)
    assert reference["applied"] == () and main["applied"] == ("precision",)
    assert set(main["gemms"].values()) == {"bf16-copy, main-grad accumulated", "grouped bf16-copy, main-grad accumulated"}
    assert_tracks_autocast(main, reference)


def test_fp32_runs_and_fp8_gemms_keep_their_layout():
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "fp8.enabled=true", "fp8.backend=emulated"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"), dtype=torch.bfloat16)
    gemms = {n: m.strategy.gemm for n, m in built.model.named_modules() if isinstance(m, (Linear, GroupedExperts))}
    main = {n for n, g in gemms.items() if isinstance(g, (MainGradGemm, MainGradGroupedGemm))}
    assert main == {"lm_head", "mtp.0.eh_proj"}                  # the GEMMs FP8 leaves in high precision
    assert built.applied == ("fp8", "precision") and len(built.weight_copies) == 2
    fp32 = build_model(cfg, Mesh(), torch.device("cpu"))
    assert "precision" not in fp32.applied and fp32.weight_copies is None


@pytest.mark.parametrize("overrides, returned", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"],
     {"self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "mlp.experts"}),      # replicated over TP, own tokens
    (["parallel.zero_stage=1"], "all"),
    (["parallel.zero_stage=0"], set()),
])
def test_hook_reduced_gradients_reach_autograd(overrides, returned):
    """Weights whose gradients hooks reduce (the TP sum of a replicated weight under sequence
    parallelism, DeepSpeed's) get their gradients returned to autograd; the rest accumulate."""
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", *overrides]).validate(2)
    built = build_model(cfg, layout_mesh(cfg.parallel, 2), torch.device("meta"), initialise=False, dtype=torch.bfloat16)
    got = {n for n, m in built.model.named_modules() if isinstance(m, (Linear, GroupedExperts))
           and not m.strategy.gemm.accumulate}
    if returned == "all":
        assert got == {n for n, m in built.model.named_modules() if isinstance(m, (Linear, GroupedExperts))}
    else:
        assert {n.split(".", 2)[-1] for n in got if n.startswith("layers.")} == returned


def _rank_main(rank, world_size, cache, run_root, overrides):
    results = {}
    for precision in ("autocast", "main_grads"):
        cfg = config(cache, f"{run_root}/{precision}", precision, "train.global_batch=8", *overrides).validate(world_size)
        data = prepare_data(cfg.data, cfg.model.vocab_size)
        result = train_bf16(cfg, data, build_mesh(cfg.parallel))
        results[precision] = {k: result[k] for k in ("losses", "start", "weights", "applied")}
    return results


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.zero_stage=1"],
    ["parallel.zero_stage=0"],
], ids=["tp2-sp", "dp2-zero1", "dp2-allreduce"])
def test_parallel_bf16_training_tracks_autocast(tmp_path, data_cache, overrides):
    for rank, result in enumerate(run_ranks(_rank_main, 2, args=(data_cache, str(tmp_path), overrides), timeout=600)):
        assert "precision" in result["main_grads"]["applied"], rank
        assert_tracks_autocast(result["main_grads"], result["autocast"])


def model_gradients(precision: str, compile_setting: str) -> tuple[tuple, dict]:
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "train.seq_len=32", f"train.precision={precision}",
                                            f"train.compile={compile_setting}"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"), compile_backend="aot_eager", dtype=torch.bfloat16)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(2):                  # the second micro-batch accumulates into the first one's .grad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = built.model(tokens[:, :-1], tokens[:, 1:], 0.3)
        out.loss.backward()
    return built.applied, {n: p.grad for n, p in built.model.named_parameters()}


def test_compiled_layers_run_the_main_grad_gemms():
    torch._dynamo.reset()
    applied, compiled = model_gradients("main_grads", "layers")
    assert applied == ("precision", "compile")
    _, eager = model_gradients("main_grads", "none")
    for name, g in eager.items():
        assert (compiled[name] - g).norm() <= 2e-2 * g.norm(), name


@pytest.mark.parametrize("compile_setting, main_grads", [("layers", False), ("none", True)])
def test_auto_precision_takes_main_grads_where_layers_run_eagerly(compile_setting, main_grads):
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", f"train.compile={compile_setting}"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("meta"), initialise=False, dtype=torch.bfloat16)
    assert ("precision" in built.applied) == main_grads
