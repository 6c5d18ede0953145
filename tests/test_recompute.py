"""`train.recompute` (model/recompute.py): the recomputed layers give the gradients of the plain ones
(fp32 on CPU: exactly), route every token as the original forward did even when the recomputed
router would choose otherwise, and count the MoE statistics once; compiled layers too. The
memory and time it trades are measured on GPU (benchmarks/RESULTS.md)."""
import pytest
import torch

from megads.config import ConfigError, load_config
from megads.model.block import DecoderLayer, DecoderLayerStrategy
from megads.model.recompute import Recompute
from megads.parallel.builder import build_model
from megads.parallel.mesh import Mesh


def gradients(recompute: str, compile_setting: str = "none", move_router_bias: bool = False) -> dict:
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", f"train.recompute={recompute}",
                                            f"train.compile={compile_setting}"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"), compile_backend="aot_eager")
    model = built.model
    for moe in model.moe_layers():
        moe.balance_alpha = 0.01
    norm_calls = []
    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            layer.input_layernorm.register_forward_hook(lambda *_: norm_calls.append(1))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:], 0.3)
    forward_calls = len(norm_calls)
    if move_router_bias:     # a recomputed router would now choose other experts for many tokens
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.randn(moe.n_experts, generator=torch.Generator().manual_seed(1)))
    out.loss.backward()
    return {"applied": built.applied, "loss": out.loss.detach(), "forward_calls": forward_calls,
            "backward_calls": len(norm_calls) - forward_calls,
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "loads": [moe.expert_load.clone() for moe in model.moe_layers()],
            "runs": {repr(m.strategy.run) for m in model.modules() if isinstance(m, DecoderLayer)}}


@pytest.fixture(scope="module")
def plain():
    return gradients("none")


def assert_same_gradients(got, plain):
    assert torch.equal(got["loss"], plain["loss"])
    assert got["grads"].keys() == plain["grads"].keys()
    for name, g in plain["grads"].items():
        assert torch.equal(got["grads"][name], g), name
    assert all(torch.equal(a, b) for a, b in zip(got["loads"], plain["loads"]))      # counted once
    assert all(load.sum() > 0 for load in got["loads"])


@pytest.mark.parametrize("setting", ["selective", "full"])
def test_recomputed_layers_give_the_same_gradients(plain, setting):
    got = gradients(setting, move_router_bias=True)
    assert got["applied"] == ("recompute",) and got["runs"] == {f"recompute-{setting}"}
    assert got["forward_calls"] == plain["forward_calls"] == 5                         # 4 layers + MTP's
    assert plain["backward_calls"] == 0 and got["backward_calls"] == 5                 # each layer ran again
    assert_same_gradients(got, plain)


def test_moved_routing_would_change_the_gradients(plain):
    """The control of the test above: without recompute, the same bias move after the forward
    changes nothing (the routing is done), so the test above shows the recomputed forward did not
    route again; with routing recomputed, the gradients would differ or the shapes mismatch."""
    kept = Recompute("no routing kept", frozenset())
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"))
    for layer in built.model.modules():
        if isinstance(layer, DecoderLayer):
            layer.strategy = DecoderLayerStrategy(kept)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    for moe in built.model.moe_layers():
        moe.balance_alpha = 0.01
    out = built.model(tokens[:, :-1], tokens[:, 1:], 0.3)
    for moe in built.model.moe_layers():
        moe.gate.e_score_correction_bias.add_(torch.randn(moe.n_experts, generator=torch.Generator().manual_seed(1)))
    try:
        out.loss.backward()
    except Exception:        # noqa: BLE001 - the recomputed tensors' shapes no longer match: also a change
        return
    changed = [n for n, g in plain["grads"].items() if not torch.equal(built.model.get_parameter(n).grad, g)]
    assert changed


@pytest.mark.parametrize("setting", ["selective", "full"])
def test_compiled_recomputed_layers_give_the_same_gradients(plain, setting):
    torch._dynamo.reset()
    got = gradients(setting, "layers", move_router_bias=True)
    assert got["applied"] == ("recompute", "compile")
    assert_same_gradients(got, plain)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.pp=2", "model.num_layers=4"], "parallel.pp=2"),
    (["train.recompute=some"], "train.recompute must be none, selective or full"),
])
def test_settings_recompute_does_not_take_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config("configs/tiny.yaml", ["parallel.tp=1", "train.recompute=full", *overrides]).validate(2)


def _parallel_rank(rank, world_size, cache, overrides):
    from megads.data import prepare_data
    from megads.parallel.mesh import build_mesh
    from megads.train.trainer import Trainer
    results = {}
    for setting in ("none", "selective", "full"):
        cfg = load_config("configs/tiny.yaml", [
            "parallel.tp=1", "model.num_layers=3", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
            "train.eval_interval=0", "data.synthetic_docs=2000", "data.synthetic_valid_docs=100",
            f"data.cache_dir={cache}", f"train.recompute={setting}", *overrides]).validate(world_size)
        trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size), build_mesh(cfg.parallel))
        losses = []
        for _ in range(2):
            result = trainer.train_step(trainer.train_batches.next_step())
            trainer.step += 1
            losses.append((result.loss, result.grad_norm, result.tokens_off_rank))
        results[setting] = {"losses": losses, "applied": trainer.built.applied,
                            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    return results


@pytest.mark.parametrize("overrides", [["parallel.ep=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]],
                         ids=["ep2", "tp2-sp"])
def test_recompute_under_expert_and_tensor_parallelism(data_cache, overrides):
    """The collectives inside a layer (the experts' all-to-all, TP's reductions) run again in the
    recomputed forward, in the same order on every rank: the run equals the one without recompute."""
    from distributed import run_ranks
    for result in run_ranks(_parallel_rank, 2, args=(data_cache, overrides), timeout=600):
        plain = result["none"]
        for setting in ("selective", "full"):
            got = result[setting]
            assert "recompute" in got["applied"]
            assert got["losses"] == plain["losses"], setting
            for name, w in plain["weights"].items():
                assert torch.equal(got["weights"][name], w), (setting, name)


def main_grad_gradients(recompute: str) -> dict:
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "train.seq_len=32", "train.precision=main_grads",
                                            f"train.recompute={recompute}"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"), dtype=torch.bfloat16)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(2):                  # the second micro-batch adds into the first one's fp32 .grad in place
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = built.model(tokens[:, :-1], tokens[:, 1:], 0.3)
        out.loss.backward()
    assert "precision" in built.applied
    return {n: p.grad for n, p in built.model.named_parameters()}


@pytest.mark.parametrize("setting", ["selective", "full"])
def test_recompute_with_main_gradients(setting):
    """The recomputed forward rebuilds the GEMMs' saved inputs; their weight gradients still go
    into the fp32 .grad the original forward named, once."""
    plain, got = main_grad_gradients("none"), main_grad_gradients(setting)
    for name, g in plain.items():
        assert torch.equal(got[name], g), name
