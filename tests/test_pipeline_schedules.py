"""Pipeline schedules as data: generators, the simulator (dependency order, matched
communication, deadlock freedom, bubble), DualPipeV against torch's own generator, the
zero-bubble weight-gradient split, the layout string and the configuration rules."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megads.config import ConfigError, load_config
from megads.model.layers import Linear
from megads.model.moe import GroupedExperts
from megads.parallel.pipeline.placement import even_split, parse_layout
from megads.parallel.pipeline.schedules import Action, Schedule, build_schedule
from megads.parallel.pipeline.simulator import ScheduleError, Times, simulate
from megads.parallel.pipeline.zero_bubble import WeightGradStore, deferred_strategies

GRID = [("1f1b", pp, m) for pp in (2, 3, 4, 8) for m in (1, pp, 2 * pp + 1)] + \
       [("dualpipe", pp, m) for pp in (2, 4, 6, 8) for m in (2 * pp, 2 * pp + 2, 3 * pp + 2 * (pp % 2 == 0))] + \
       [("dualpipev", pp, m) for pp in (1, 2, 3, 4, 8) for m in (2 * pp, 2 * pp + 1, 3 * pp)]


@pytest.mark.parametrize("name, pp, m", GRID)
def test_generated_schedules_run_without_deadlock(name, pp, m):
    s = build_schedule(name, pp, m)
    timeline = simulate(s)
    assert len(timeline.spans) == pp
    computed = {(kind, c, mb) for acts in s.actions for a in acts for kind, c, mb in
                ([("F", a.chunk, a.mb), ("BW", a.b_chunk, a.b_mb)] if a.kind == "FB" else [(a.kind, a.chunk, a.mb)])}
    assert {mb for kind, _, mb in computed if kind == "F"} == set(range(m))


def _torch_order(pp: int, m: int) -> list[list[tuple]]:
    """torch.distributed.pipelining's ScheduleDualPipeV action order (its per-rank generator)."""
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV, _ComputationType as T
    short = {T.FORWARD: "F", T.BACKWARD_INPUT: "I", T.BACKWARD_WEIGHT: "W", T.FULL_BACKWARD: "B"}
    owner = SimpleNamespace(pp_group_size=pp, _n_microbatches=m)
    order = []
    for rank in range(pp):
        acts = []
        for a in ScheduleDualPipeV._calculate_single_rank_operations(owner, rank):
            if a.sub_actions:
                acts.append(("FB",) + tuple((s.stage_index, short[s.computation_type], s.microbatch_index)
                                            for s in a.sub_actions))
            else:
                acts.append((a.stage_index, short[a.computation_type], a.microbatch_index))
        order.append(acts)
    return order


def _megads_order(s: Schedule) -> list[list[tuple]]:
    """megads' actions in torch's vocabulary: F, I (input backward), W, B (full backward), stage indices."""
    names = {"F": "F", "B": "I", "W": "W", "BW": "B"}
    order = []
    for rank, acts in enumerate(s.actions):
        out = []
        for a in acts:
            if a.kind == "FB":
                out.append(("FB", (s.stage_of(rank, a.chunk), "F", a.mb), (s.stage_of(rank, a.b_chunk), "B", a.b_mb)))
            elif a.kind in names:
                out.append((s.stage_of(rank, a.chunk), names[a.kind], a.mb))
        order.append(out)
    return order


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 5), (2, 8), (2, 11), (4, 8), (4, 10), (4, 13), (4, 20)])
def test_dualpipev_order_equals_torch(pp, m):
    assert _megads_order(build_schedule("dualpipev", pp, m)) == _torch_order(pp, m)


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp):
    for m in (8, 17, 32):
        for f, b, w in ((1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 3.0, 1.0)):
            timeline = simulate(build_schedule("1f1b", pp, m), Times(f, b, w))
            full_backward = b + w
            for rank in range(pp):
                assert timeline.bubble(rank) == pytest.approx((pp - 1) * (f + full_backward))
            assert timeline.makespan == pytest.approx((m + pp - 1) * (f + full_backward))


@pytest.mark.parametrize("pp", [2, 4, 6, 8, 10])
def test_dualpipe_bubble_matches_published_formula(pp):
    """DeepSeek-V3 report, Table 2: (PP/2 - 1)(F&B + B - 3W) with B the full backward, under the
    zero-bubble cost model F = B_input = W, for an overlapped pair between F + B_input and F + B."""
    for extra in (0, 2, 12):
        for unit in (1.0, 2.5):
            for overlap in (2.0, 2.5, 3.0):
                f = b = w = unit
                fb = overlap * unit
                timeline = simulate(build_schedule("dualpipe", pp, 2 * pp + extra), Times(f, b, w, fb))
                expected = (pp / 2 - 1) * (fb + (b + w) - 3 * w)
                assert max(timeline.bubble(r) for r in range(pp)) == pytest.approx(expected), (extra, unit, overlap)


def _edit(s: Schedule, rank: int, edit) -> Schedule:
    actions = [list(a) for a in s.actions]
    actions[rank] = edit(actions[rank])
    return Schedule(s.name, s.pp, s.n_micro, s.paths, actions)


def test_missing_receive_is_rejected_naming_the_action():
    s = build_schedule("1f1b", 2, 4)
    broken = _edit(s, 1, lambda acts: [a for a in acts if a != Action("RECV_F", 0, 2)])
    with pytest.raises(ScheduleError, match=r"rank 1: action \d+ \(F0\.2\) cannot run: its input activation was not received"):
        simulate(broken)


def test_swapped_forward_and_backward_is_rejected_naming_the_action():
    s = build_schedule("dualpipe", 4, 8)

    def swap(acts):
        i, j = acts.index(Action("F", 0, 0)), acts.index(Action("B", 0, 0))
        acts[i], acts[j] = acts[j], acts[i]
        return acts
    with pytest.raises(ScheduleError, match=r"rank 3: action \d+ \(B0\.0\) cannot run: F0\.0 has not run on this rank"):
        simulate(_edit(s, 3, swap))


def test_receive_before_its_send_deadlocks():
    s = build_schedule("1f1b", 2, 4)

    def early(acts):
        acts.remove(Action("RECV_B", 0, 0))
        return [Action("RECV_B", 0, 0)] + acts
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 waits at RECV_B0\.0; rank 1 waits at RECV_F0\.0"):
        simulate(_edit(s, 0, early))


def test_missing_weight_step_and_unmatched_send_are_rejected():
    s = build_schedule("dualpipev", 2, 4)
    with pytest.raises(ScheduleError, match=r"W1\.\d runs 0 times"):
        simulate(_edit(s, 0, lambda acts: [a for a in acts if not (a.kind == "W" and a.chunk == 1)][:] or acts))
    one = build_schedule("1f1b", 2, 2)
    extra = _edit(one, 0, lambda acts: acts + [Action("SEND_F", 0, 1)])
    with pytest.raises(ScheduleError, match=r"SEND_F0\.1 is sent twice"):
        simulate(extra)


def plain_and_deferred(n_in: int, n_out: int):
    """Two equal Linears, the second deferring its weight gradient to a store; two equal inputs
    [2, 3, n_in] with gradients."""
    torch.manual_seed(0)
    plain, deferred = Linear(n_in, n_out), Linear(n_in, n_out)
    plain.weight.data.normal_()
    deferred.weight.data.copy_(plain.weight.data)
    strategies = deferred_strategies(deferred, {})
    deferred.strategy, deferred_count = strategies[""], len(strategies)
    x = torch.randn(2, 3, n_in, requires_grad=True)
    return plain, deferred, deferred_count, WeightGradStore(), x, x.detach().clone().requires_grad_()


def test_deferred_weight_gradients_equal_the_plain_ones():
    plain, deferred, deferred_count, store, x, x2 = plain_and_deferred(6, 5)
    assert deferred_count == 1
    for _ in range(2):                                   # two micro-batches accumulate
        (plain(x) ** 2).sum().backward()
        with store.collect((0, 0)):
            (deferred(x2) ** 2).sum().backward()
    assert deferred.weight.grad is None                  # B computed input gradients only
    assert torch.allclose(x2.grad, x.grad)
    assert store.pending() == [(0, 0)]
    store.flush((0, 0))
    assert store.pending() == []
    assert torch.allclose(deferred.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    assert deferred.strategy.gemm is not F.linear


@pytest.mark.parametrize("dim, grouped_mm", [(16, True), (6, False)], ids=["grouped_mm", "loop-fallback"])
def test_deferred_expert_weight_gradients_equal_the_plain_ones(monkeypatch, dim, grouped_mm):
    """The routed experts' grouped GEMM defers its weight gradients by itself, on torch._grouped_mm
    and on the per-expert loop that rows of dim 6 (24 bytes, not 16-byte aligned) fall back to."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = GroupedExperts(3, dim, 8)
    for p in plain.parameters():
        p.data.normal_()
    deferred = copy.deepcopy(plain)
    counts = torch.tensor([2, 0, 4])
    x = torch.randn(6, dim, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    store = WeightGradStore()
    for _ in range(2):                                   # two micro-batches accumulate
        (plain(x, counts) ** 2).sum().backward()
        with store.collect((0, 0)):
            (deferred(x2, counts) ** 2).sum().backward()
    assert all(p.grad is None for p in deferred.parameters())
    assert torch.equal(x2.grad, x.grad)
    store.flush((0, 0))
    assert store.pending() == [] and store.deferred == 6
    for p, q in zip(deferred.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert bool(calls) == grouped_mm


def test_layout_string_and_even_split():
    assert parse_layout("Ett|tt|t|tLm", 6, 4, mtp=True) == [2, 2, 1, 1]
    assert even_split(7, 3) == [3, 2, 2]
    for layout, message in [("Ett|tt|ttL", "has 3 stages"), ("tt|Ett|tt|ttL", "embedding E must open"),
                            ("Ett|tL|tt|tt", "head L must close"), ("Ett|tt|tt|tL", "places 7 layers"),
                            ("Ett|tt|tt|ttLm", "model.mtp_depth=0")]:
        with pytest.raises(ConfigError, match=message):
            parse_layout(layout, 7 if "places" not in message else 8, 4, mtp=False)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.pp=3", "parallel.pipeline_schedule=dualpipe", "train.global_batch=12", "train.micro_batch=1"], 3,
     "dualpipe needs an even parallel.pp"),
    (["parallel.pp=2", "parallel.pipeline_schedule=dualpipe", "train.global_batch=6", "train.micro_batch=2"], 2,
     r"micro-batches per step = train.global_batch / \(dp \* train.micro_batch\) = 3 to be even and >= 2 \* parallel.pp = 4"),
    (["parallel.pp=2", "parallel.pipeline_schedule=dualpipev", "train.global_batch=8", "train.micro_batch=2"], 4,
     r"= 2 to be >= 2 \* parallel.pp = 4"),
    (["parallel.pp=4", "parallel.pipeline_schedule=dualpipev", "train.global_batch=16", "train.micro_batch=1"], 4,
     "model.num_layers=4 is fewer than the 8 pipeline stages"),
    (["parallel.pp=2", "parallel.pipeline_layout=Ett|tL"], 2, "head L and MTP m must close"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 4, "parallel.zero_stage=2 with parallel.pp=2 is not supported"),
])
def test_configs_that_cannot_pipeline_fail_validation(overrides, world, message):
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", *overrides])
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world)


def test_valid_pipeline_config_passes():
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_schedule=dualpipe",
                                            "train.global_batch=8", "train.micro_batch=2",
                                            "parallel.pipeline_layout=Ett|ttLm"])
    assert cfg.validate(2).parallel.pp == 2


def test_plot_schedule_draws_simulated_and_measured_timelines(tmp_path):
    import json
    from tools.plot_schedule import main
    main(["dualpipe", "--pp", "4", "--micro-batches", "8", "--times", "1,1,1,2", "--out", str(tmp_path / "sim.png")])
    timeline = simulate(build_schedule("1f1b", 2, 3))
    spans = [[[str(a), start, end] for a, start, end in rank] for rank in timeline.spans]
    (tmp_path / "spans.json").write_text(json.dumps(spans))
    main(["1f1b", "--pp", "2", "--micro-batches", "3", "--measured", str(tmp_path / "spans.json"),
          "--out", str(tmp_path / "run.png")])
    for name in ("sim.png", "run.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _traced_rank(rank, world_size, cache, run_dir):
    from test_parallel_core import make_config
    from megads.data import prepare_data
    from megads.parallel.mesh import build_mesh
    from megads.train.trainer import Trainer
    cfg = make_config(cache, ["model.num_layers=4", "train.micro_batch=1", "parallel.pp=2",
                              "parallel.pipeline_schedule=dualpipe", "parallel.pipeline_trace_step=2",
                              f"train.run_dir={run_dir}"], world_size)
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size), build_mesh(cfg.parallel))
    for _ in range(2):
        trainer.train_step(trainer.train_batches.next_step())
        trainer.step += 1
    return [str(a) for a in trainer.pipeline.schedule.actions[trainer.mesh.pp_rank]]


def test_a_real_run_records_its_pipeline_timeline(tmp_path, data_cache):
    """parallel.pipeline_trace_step: step 2 of a DualPipe run on 2 ranks writes each rank's
    actions, in schedule order with increasing times, and plot_schedule draws them."""
    import json
    from distributed import run_ranks
    from tools.plot_schedule import main
    orders = run_ranks(_traced_rank, 2, args=(data_cache, str(tmp_path)), timeout=600)
    spans = json.loads((tmp_path / "pipeline_trace.json").read_text())
    assert [[name for name, _, _ in rank] for rank in spans] == orders
    for rank in spans:
        times = [t for _, start, end in rank for t in (start, end)]
        assert times == sorted(times) and times[0] >= 0
    main(["dualpipe", "--pp", "2", "--micro-batches", "8", "--measured", str(tmp_path / "pipeline_trace.json"),
          "--out", str(tmp_path / "measured.png")])
    assert (tmp_path / "measured.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_step_without_a_pipeline_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_trace_step=3 .* needs parallel\.pp > 1"):
        load_config("configs/tiny.yaml", ["parallel.tp=1", "parallel.pipeline_trace_step=3"]).validate(1)


def test_sends_out_of_the_receivers_order_are_rejected():
    """Transports that match messages between two ranks in order (NCCL) need sends in receive order."""
    s = build_schedule("1f1b", 2, 4)

    def late(acts):
        acts.remove(Action("SEND_F", 0, 0))
        acts.insert(acts.index(Action("SEND_F", 0, 1)) + 1, Action("SEND_F", 0, 0))
        return acts
    with pytest.raises(ScheduleError, match=r"rank 0 sends SEND_F0\.1 to rank 1 where rank 1 receives RECV_F0\.0 first"):
        simulate(_edit(s, 0, late))


def test_deferred_weight_gradients_under_bf16_autocast_equal_the_plain_ones():
    """The GPU path: autocast casts inside the deferred GEMM, the queued dW flows back to the fp32 weight."""
    plain, deferred, _, store, x, x2 = plain_and_deferred(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y2 = plain(x), deferred(x2)
    assert y2.dtype == torch.bfloat16 and torch.equal(y, y2)
    (y.float() ** 2).sum().backward()
    with store.collect((1, 0)):
        (y2.float() ** 2).sum().backward()
    assert deferred.weight.grad is None
    store.flush((1, 0))
    assert deferred.weight.grad.dtype == torch.float32
    assert torch.equal(deferred.weight.grad, plain.weight.grad) and torch.equal(x2.grad, x.grad)
