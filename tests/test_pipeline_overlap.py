"""The overlapped F&B action: the slots it runs (a forward's pieces paired with another
micro-batch's backward pieces, as docs/pipeline.md lays out), the piece chain against the
layer it cuts up, and the numbers: under expert parallelism (EP=2 over gloo) an FB action gives
bitwise the losses, gradients and expert loads of the forward followed by the backward, and both
equal the plain (uncut) model's."""
import contextlib

import torch

from distributed import run_ranks
from test_parallel_core import assert_close
from megads.config import Config, ModelConfig, ParallelConfig
from megads.model.block import DecoderLayer, Piece
from megads.model.moe import balance_loss_scale
from megads.model.rope import rope_cos_sin
from megads.parallel.builder import build_model
from megads.parallel.mesh import build_mesh
from megads.parallel.pipeline.executor import PipelineExecutor
from megads.parallel.pipeline.overlap import Chain, Streams, overlapped_forward_backward, plan_slots, run_all
from megads.parallel.pipeline.p2p import P2P
from megads.parallel.pipeline.pieces import backward_steps, forward_steps
from megads.parallel.pipeline.placement import StageSpec
from megads.parallel.pipeline.schedules import Action, Schedule
from megads.parallel.pipeline.zero_bubble import WeightGradStore

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_heads=2, q_lora_rank=16,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_group=2,
           topk_group=1, num_experts_per_tok=2, max_position_embeddings=64, init_std=0.1)


def _moe_layers(n: int) -> tuple[ModelConfig, list[DecoderLayer]]:
    cfg = ModelConfig(**CFG, num_layers=n, first_k_dense=0)
    torch.manual_seed(0)
    layers = [DecoderLayer(cfg, moe=True) for _ in range(n)]
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layer.mlp.balance_alpha = 0.01
    return cfg, layers


def _chain_of(layers: list[DecoderLayer], cos, sin) -> list[Piece]:
    return [p._replace(name=f"{i}.{p.name}") for i, layer in enumerate(layers) for p in layer.pieces(cos, sin)]


def _run_forward(pieces, x, streams):
    cuts, result = [], []
    run_all(Chain(pieces, forward_steps(pieces, x, cuts, result)), streams)
    return cuts, result


def _backward_chain(cuts, grad, log: list) -> Chain:
    """The backward half, logging each piece's name once its backward has run."""
    names = [c.piece.name for c in reversed(cuts)]

    def logged(steps):
        for name, _ in zip(names, steps):
            log.append(("B", name))
            yield
        for _ in steps:
            pass
    return Chain([c.piece for c in reversed(cuts)], logged(backward_steps(cuts, grad)))


def _logged(pieces: list[Piece], log: list) -> list[Piece]:
    def run(fn, name):
        def logged(state):
            out = fn(state)
            log.append(("F", name))
            return out
        return logged
    return [p._replace(fn=run(p.fn, p.name)) for p in pieces]


def test_piece_chain_is_the_layer_and_its_backward():
    """Forward through the cut pieces (which hand each other several tensors: the dispatched rows,
    gates, routing metadata, balance loss, residual) equals the layers' forward; backward piece
    by piece gives the uncut gradients."""
    cfg, layers = _moe_layers(2)
    cos, sin = rope_cos_sin(cfg, 8, torch.device("cpu"))
    x = torch.randn(2, 8, 32, requires_grad=True)
    grad = torch.randn(2, 8, 32)
    streams = Streams(x.device)
    cuts, result = _run_forward(_chain_of(layers, cos, sin), x, streams)
    assert [c.piece.name for c in cuts] == [f"{i}.{n}" for i in (0, 1) for n in ("attention", "dispatch", "experts", "combine")]
    assert len(cuts[1].roots) == 4, "dispatch hands on the normed input, the dispatched rows, the gates and the balance loss"
    run_all(_backward_chain(cuts, grad, []), streams)
    got = {f"{i}.{n}": p.grad.clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    got["x"] = x.grad.clone()
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_()
    with balance_loss_scale(1.0):
        h = x_ref
        for layer in layers:
            h = layer(h, cos, sin)
    assert torch.equal(result[0], h), "the pieces compose to the layers' forward"
    h.backward(grad)
    ref = {f"{i}.{n}": p.grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    ref["x"] = x_ref.grad
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], f"gradient of {name}")


LAYER_SLOTS = [("attention", "combine"), ("dispatch", "experts"), ("experts", "dispatch"), ("combine", "attention")]


def test_overlapped_pair_runs_the_documented_slots():
    """Two micro-batches through two MoE layers: every slot pairs one's computation with the
    other's all-to-all (docs/pipeline.md), and on CPU each slot runs its computing piece first."""
    cfg, layers = _moe_layers(2)
    cos, sin = rope_cos_sin(cfg, 8, torch.device("cpu"))
    x0, x1 = torch.randn(2, 8, 32, requires_grad=True), torch.randn(2, 8, 32, requires_grad=True)
    streams = Streams(x0.device)
    cuts0, _ = _run_forward(_chain_of(layers, cos, sin), x0, streams)
    log: list = []
    forward = _logged(_chain_of(layers, cos, sin), log)
    cuts1, result = [], []
    slots = overlapped_forward_backward(Chain(forward, forward_steps(forward, x1, cuts1, result)),
                                        _backward_chain(cuts0, torch.ones(2, 8, 32), log), streams)
    expected = [(f"{i}.{f}", f"{1 - i}.{b}") for i in (0, 1) for f, b in LAYER_SLOTS]
    assert slots == expected
    computing = {"attention", "experts"}
    order = [step for f, b in expected
             for step in ((("F", f), ("B", b)) if f.split(".")[1] in computing else (("B", b), ("F", f)))]
    assert log == order
    assert result and len(cuts1) == 8 and x0.grad is not None


def test_slots_pair_as_many_pieces_as_possible():
    """A whole first-and-last stage (embedding, a dense layer, two MoE layers, the head) against
    its own reverse: the plan keeps both orders and pairs all 8 all-to-all pieces with
    computation, leaving the rest alone (the backward's first)."""
    def piece(name, communicates=False):
        return Piece(name, communicates, None)
    forward = [piece("embed"), piece("0.attention"), piece("0.mlp")]
    forward += [piece(f"{i}.{n}", n in ("dispatch", "combine")) for i in (1, 2)
                for n in ("attention", "dispatch", "experts", "combine")]
    forward.append(piece("head"))
    backward = forward[::-1]
    slots = plan_slots(forward, backward)
    assert [i for i, _ in slots if i is not None] == list(range(len(forward)))
    assert [j for _, j in slots if j is not None] == list(range(len(backward)))
    pairs = [(forward[i], backward[j]) for i, j in slots if i is not None and j is not None]
    assert len(pairs) == 8 and all(f.communicates != b.communicates for f, b in pairs)
    named = [(None if i is None else forward[i].name, None if j is None else backward[j].name) for i, j in slots]
    assert named == [(None, "head"), ("embed", "2.combine"), (None, "2.experts"), ("0.attention", "2.dispatch"),
                     (None, "2.attention"), ("0.mlp", "1.combine"), (None, "1.experts"), ("1.attention", "1.dispatch"),
                     ("1.dispatch", "1.attention"), ("1.experts", None), ("1.combine", "0.mlp"), ("2.attention", None),
                     ("2.dispatch", "0.attention"), ("2.experts", None), ("2.combine", "embed"), ("head", None)]


def _fb_main(rank, world_size):
    """One stage holding the whole model (embedding, a dense and two MoE layers, head, MTP) with
    its experts over EP=2; two micro-batches per rank."""
    cfg = ModelConfig(**CFG, num_layers=3, first_k_dense=1, mtp_depth=1)
    parallel = ParallelConfig(ep=world_size)
    model = build_model(Config(model=cfg, parallel=parallel), build_mesh(parallel), torch.device("cpu")).model
    for moe in model.moe_layers():
        moe.balance_alpha = 0.01
    g = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2)]

    def run(actions):
        model.zero_grad(set_to_none=True)
        for moe in model.moe_layers():
            moe.expert_load.zero_()
        schedule = Schedule("pair", 1, 2, [[(0, 0)]], [actions])
        executor = PipelineExecutor(model, schedule, {0: StageSpec(0, (0, 1, 2), True, True)}, 0, P2P([rank]),
                                    WeightGradStore(), (2, 16, 32), [], None, contextlib.nullcontext)
        totals = executor.train_step(batches, mtp_weight=0.3)
        return {"totals": totals, "slots": executor.overlap_slots,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "loads": [m.expert_load.clone() for m in model.moe_layers()]}

    separate = run([Action("F", 0, 0), Action("F", 0, 1), Action("BW", 0, 0), Action("BW", 0, 1)])
    paired = run([Action("F", 0, 0), Action("FB", 0, 1, 0, 0), Action("BW", 0, 1)])
    model.zero_grad(set_to_none=True)
    with balance_loss_scale(0.5):
        for b in batches:
            (model(b[:, :-1], b[:, 1:], mtp_weight=0.3).loss / 2).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    return separate, paired, plain


def test_fb_action_equals_forward_then_backward_under_ep():
    for separate, paired, plain in run_ranks(_fb_main, 2, timeout=600):
        assert paired["slots"] and sum(f is not None and b is not None for f, b in paired["slots"]) == 8
        assert torch.equal(paired["totals"], separate["totals"])
        assert all(torch.equal(a, b) for a, b in zip(paired["loads"], separate["loads"]))
        assert paired["grads"].keys() == separate["grads"].keys() == plain.keys()
        for name, grad in separate["grads"].items():
            assert torch.equal(paired["grads"][name], grad), f"FB gradient of {name} differs from F then B"
            assert_close(grad, plain[name], f"gradient of {name}")
