"""Parity of tensor, sequence and data parallelism (DeepSpeed ZeRO) with the single-process run.

Each case trains 3 optimizer steps in fp32 on CPU ranks over gloo and compares, with the
single-process run on the same global batches: the per-step losses and gradient norms, the
full gradients of the first step, and every updated weight and router bias; the router biases,
replicated, must also be identical on every rank.

Adam divides each gradient element by its own magnitude, so an element whose gradient is near
zero turns float32 rounding of the reductions (absolute size ~1e-7 x the largest gradient) into
a weight difference of up to lr x its relative rounding. The test therefore uses lr 2e-4 and
Adam eps 1e-6, which bounds that amplification to lr x rounding / eps (~1e-8); a wrong gradient
still moves weights by ~lr, a hundred times the tolerance.
"""
import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from megads.config import load_config
from megads.data import BatchLoader, PackedSequences, prepare_data
from megads.model.moe import balance_loss_scale
from megads.parallel.builder import build_model
from megads.parallel.mesh import build_mesh
from megads.train.trainer import Trainer

STEPS = 3
SMALL = ["parallel.tp=1", "model.hidden_size=64", "model.num_layers=3", "model.intermediate_size=128", "model.moe_intermediate_size=32",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "model.mtp_depth=1", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
         "train.warmup_steps=1", "train.lr=2e-4", "train.min_lr=2e-5", "train.eps=1e-6", "train.eval_interval=0", "data.synthetic_docs=2000", "data.synthetic_valid_docs=100",
         "train.seq_aux_alpha=0.01", "train.bias_update_speed=0.01"]


def make_config(cache, overrides, world_size):
    return load_config("configs/tiny.yaml", SMALL + [f"data.cache_dir={cache}", *overrides]).validate(world_size)


def unshard(tensor, placement, plan):
    """The full tensor of a TP or EP shard (gathered along its split dimension)."""
    for split, group, dim in ((placement.tp_dim is not None, "tp", placement.tp_dim), (placement.expert, "ep", 0)):
        if split:
            parts = [torch.empty_like(tensor) for _ in range(plan.mesh.size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=plan.mesh.group(group))
            tensor = torch.cat(parts, dim=dim)
    return tensor


def full_tensors(model, plan) -> dict:
    return {name: unshard(t, plan.of(t), plan).detach().clone() for name, t in model.state_dict(keep_vars=True).items()}


def full_gradients(model, plan) -> dict:
    from megads.parallel.data import average_gradients
    named = [(n, p) for n, p in model.named_parameters()]
    average_gradients(named, plan)
    return {name: unshard(p.grad, plan.of(p), plan) for name, p in named}


def first_step_gradients(cfg, data, mesh) -> dict:
    """Gradients of the first global batch from a plain (non-DeepSpeed) copy of the parallel model."""
    built = build_model(cfg, mesh, torch.device("cpu"))
    model = built.model
    for moe in model.moe_layers():
        moe.balance_alpha = cfg.train.seq_aux_alpha
    t = cfg.train
    sequences = PackedSequences(data.train, t.seq_len, t.seed, data.tokenizer.eos_id)
    batches = BatchLoader(sequences, t.global_batch, t.micro_batch, mesh.dp_rank, mesh.dp).next_step()
    with balance_loss_scale(1.0 / len(batches)):
        for batch in batches:
            (model(batch[:, :-1], batch[:, 1:], 0.3).loss / len(batches)).backward()
    return full_gradients(model, built.plan)


def router_biases(model) -> dict:
    """Every MoE layer's router bias (replicated: each rank holds all of it)."""
    return {name: moe.gate.e_score_correction_bias.detach().clone() for name, moe in model.named_moe_layers()}


def steps_with_first_gradients(trainer, steps: int, capture) -> tuple[list, dict]:
    """`steps` optimizer steps of `trainer`, each at its own step number, and what `capture()`
    returned just before the first update (the gradients as the optimizer will see them)."""
    captured, step = {}, trainer.stepper.step

    def capture_then_step():
        if not captured:
            captured.update(capture())
        return step()
    trainer.stepper.step = capture_then_step
    results = []
    for _ in range(steps):
        results.append(trainer.train_step(trainer.train_batches.next_step()))
        trainer.step += 1
    return results, captured


def train(cfg, data, mesh) -> dict:
    grads = first_step_gradients(cfg, data, mesh)
    trainer = Trainer(cfg, data, mesh)
    steps = [trainer.train_step(trainer.train_batches.next_step()) for _ in range(STEPS)]
    for _ in steps:
        trainer.step += 1
    return {"losses": [(s.loss, s.lm_loss, s.mtp_loss, s.balance_loss) for s in steps],
            "grad_norms": [s.grad_norm for s in steps], "skipped": [s.skipped for s in steps],
            "grads": grads, "weights": full_tensors(trainer.model, trainer.plan), "biases": router_biases(trainer.model)}


def _rank_main(rank, world_size, cache, overrides):
    cfg = make_config(cache, overrides, world_size)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    mesh = build_mesh(cfg.parallel)
    result = train(cfg, data, mesh)
    return result if rank == 0 else {"losses": result["losses"], "biases": result["biases"]}


@pytest.fixture(scope="module")
def reference(data_cache):
    cfg = make_config(data_cache, [], 1)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    return train(cfg, data, build_mesh(cfg.parallel))


def assert_close(actual, expected, what, rel=1e-5):
    scale = max(expected.abs().max().item(), 1e-12)
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"{what}: max abs difference {diff:.3e} > {rel} x {scale:.3e}"


@pytest.mark.parametrize("world_size, overrides", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.zero_stage=1"]),
    (2, ["parallel.zero_stage=2"]),
    (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"]),
    (2, ["parallel.ep=2", "parallel.zero_stage=1"]),
    (4, ["parallel.ep=4", "parallel.zero_stage=1"]),
    (4, ["parallel.ep=2", "parallel.zero_stage=2"]),
    (4, ["parallel.ep=2", "parallel.zero_stage=0"]),
    (2, ["parallel.ep=2", "parallel.tp=2"]),
    (4, ["parallel.ep=2", "parallel.tp=2", "parallel.zero_stage=1"]),
    (4, ["parallel.ep=4", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"]),
], ids=["tp2", "tp2-sp", "dp2-zero1", "dp2-zero2", "dp2xtp2", "dp2xtp2-sp-zero2", "ep2-zero1", "ep4-dp4-zero1",
        "ep2-dp4-zero2", "ep2-dp4-allreduce", "ep2xtp2", "ep2xtp2-dp2-zero1", "ep4xtp2-sp-zero2"])
def test_parity_with_single_process(reference, data_cache, world_size, overrides):
    results = run_ranks(_rank_main, world_size, args=(data_cache, overrides), timeout=600)
    got = results[0]
    assert got["biases"].keys() == reference["biases"].keys() and got["biases"]
    for rank, r in enumerate(results[1:], 1):
        assert r["losses"] == got["losses"], "ranks disagree on the logged global-batch loss"
        for name, bias in got["biases"].items():
            assert torch.equal(r["biases"][name], bias), f"rank {rank} holds another router bias of {name} than rank 0"
    for name, bias in reference["biases"].items():
        assert_close(got["biases"][name], bias, f"router bias of {name} after {STEPS} steps")
    assert got["skipped"] == [False] * STEPS
    for step, (a, b) in enumerate(zip(got["losses"], reference["losses"])):
        assert_close(torch.tensor(a), torch.tensor(b), f"losses of step {step + 1}")
    assert_close(torch.tensor(got["grad_norms"]), torch.tensor(reference["grad_norms"]), "gradient norms")
    assert got["grads"].keys() == reference["grads"].keys()
    for name, g in reference["grads"].items():
        assert_close(got["grads"][name], g, f"gradient of {name}")
    assert got["weights"].keys() == reference["weights"].keys()
    for name, w in reference["weights"].items():
        assert_close(got["weights"][name], w, f"weight {name} after {STEPS} steps")


def _vocab_ce_main(rank, world_size):
    from megads.parallel.mesh import build_mesh as build
    from megads.config import ParallelConfig
    from megads.parallel.tensor import VocabParallelLoss
    mesh = build(ParallelConfig(tp=world_size))
    torch.manual_seed(0)
    logits = (torch.randn(6, 12) * 5).requires_grad_()
    targets = torch.tensor([0, 3, 5, 6, 11, 7])
    shard = logits.detach().chunk(world_size, dim=1)[rank].clone().requires_grad_()
    loss = VocabParallelLoss(rank * shard.shape[1], mesh.group("tp"))(shard, targets)
    weights = torch.arange(1.0, 7.0)
    (loss * weights).sum().backward()
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (expected * weights).sum().backward()
    return {"loss": (loss.detach(), expected.detach()),
            "grad": (shard.grad, logits.grad.chunk(world_size, dim=1)[rank])}


@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_cross_entropy(world_size):
    for result in run_ranks(_vocab_ce_main, world_size):
        loss, expected = result["loss"]
        assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
        grad, expected_grad = result["grad"]
        assert torch.allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)


def _resume_main(rank, world_size, cache, run_root):
    base = ["parallel.tp=2", "parallel.zero_stage=1", "train.lr=3e-3"]
    data = None
    states = {}
    for name, plan in (("whole", [4]), ("split", [2, 4])):
        for steps in plan:
            cfg = make_config(cache, base + [f"train.steps={steps}", f"train.run_dir={run_root}/{name}"], world_size)
            data = data or prepare_data(cfg.data, cfg.model.vocab_size)
            trainer = Trainer(cfg, data, build_mesh(cfg.parallel))
            trainer.fit()
        states[name] = trainer.model.state_dict()
    return all(torch.equal(states["whole"][k], states["split"][k]) for k in states["whole"]), trainer.step


def test_resume_dp2_tp2_is_bitwise(tmp_path, data_cache):
    import json
    results = run_ranks(_resume_main, 4, args=(data_cache, str(tmp_path)), timeout=600)
    assert results == [(True, 4)] * 4
    read = lambda name: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu", "memory_gib")}
                         for line in open(tmp_path / name / "metrics.jsonl")]
    assert read("whole") == read("split")


def test_deepspeed_config_merges_user_json(tmp_path):
    import json
    from megads.config import ConfigError
    from megads.parallel.data import deepspeed_config
    from megads.parallel.mesh import Mesh
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, "stage": 2}, "comms_logger": {"enabled": True}}))
    cfg = load_config("configs/tiny.yaml", [f"parallel.deepspeed_config={extra}", "parallel.zero_stage=2"])
    generated = deepspeed_config(cfg, Mesh(world_size=4, tp=2, dp=2))
    assert generated["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                              "reduce_bucket_size": 1000}
    assert generated["comms_logger"] == {"enabled": True}
    assert generated["train_batch_size"] == 16 and generated["gradient_accumulation_steps"] == 1
    extra.write_text(json.dumps({"gradient_clipping": 5.0}))
    with pytest.raises(ConfigError, match="gradient_clipping=5.0, which megads controls"):
        deepspeed_config(cfg, Mesh(world_size=4, tp=2, dp=2))
    extra.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage=3"):
        deepspeed_config(cfg, Mesh(world_size=4, tp=2, dp=2))
