"""Model numerics against plain references written here: MLA, the router, the bias update, the
sequence-wise balance loss, multi-token prediction, and the parameter counts at scale.

References are written from the DeepSeek-V3 report (arXiv 2412.19437) and the released model's
conventions, using only the weights of megads' modules, never megads' own helper functions.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megads.config import ModelConfig, load_config
from megads.model.deepseek_v3 import DeepSeekV3, count_parameters
from megads.model.mla import MLA
from megads.model.moe import MoE, Router
from megads.model.rope import rope_cos_sin


def small_model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, first_k_dense=1, intermediate_size=48,
                moe_intermediate_size=16, num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, mtp_depth=0, init_std=0.1)
    base.update(overrides)
    return ModelConfig(**base)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (norm weights too, so a norm applied to the wrong tensor shows)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


# ----------------------------------------------------------------------------- MLA

def reference_rope_angles(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Angles [s, rope/2] and the YaRN attention factor, written from the YaRN paper / released config."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = [base ** (-2 * j / dim) for j in range(dim // 2)]
    attention_factor = 1.0
    if cfg.rope_factor > 1:
        def pair_index(rotations):      # the pair whose wavelength makes `rotations` turns over the context
            return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(pair_index(cfg.beta_fast)), 0)
        high = min(math.ceil(pair_index(cfg.beta_slow)), dim - 1)
        blended = []
        for j, f in enumerate(inv_freq):
            interpolate = min(max((j - low) / (high - low), 0.0), 1.0)   # 0: keep f, 1: f / factor
            blended.append(f / cfg.rope_factor * interpolate + f * (1 - interpolate))
        inv_freq = blended

        def mscale(m):
            return 0.1 * m * math.log(cfg.rope_factor) + 1.0
        attention_factor = mscale(cfg.mscale) / mscale(cfg.mscale_all_dim)
    positions = torch.arange(seq_len, dtype=torch.float64)
    return positions[:, None] * torch.tensor(inv_freq, dtype=torch.float64)[None, :], attention_factor


def reference_rope(x: torch.Tensor, angles: torch.Tensor, factor: float) -> torch.Tensor:
    """Interleaved pairs (x0, x1), (x2, x3), ... rotated as complex numbers. x [s, rope]."""
    pairs = torch.view_as_complex(x.double().reshape(x.shape[0], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.full_like(angles, factor), angles)
    return torch.view_as_real(rotated).reshape(x.shape)


def reference_softmax_scale(cfg: ModelConfig) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_factor > 1:
        scale *= (0.1 * cfg.mscale_all_dim * math.log(cfg.rope_factor) + 1.0) ** 2
    return scale


def naive_mla(attn: MLA, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Per batch row and per head, with explicit loops; fp64. x [b, s, d] -> [b, s, d]."""
    eps, nope, rope, vd, heads = cfg.rms_norm_eps, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_heads
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    b, s, _ = x.shape
    angles, factor = reference_rope_angles(cfg, s)
    scale = reference_softmax_scale(cfg)
    out = torch.zeros(b, s, cfg.hidden_size, dtype=torch.float64)
    for bi in range(b):
        xb = x[bi].double()                                                   # [s, d]
        if cfg.q_lora_rank > 0:
            q_all = rms_norm(xb @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], eps) @ w["q_b_proj.weight"].T
        else:
            q_all = xb @ w["q_proj.weight"].T
        kv_a = xb @ w["kv_a_proj_with_mqa.weight"].T                        # [s, kv_lora + rope]
        latent = rms_norm(kv_a[:, :cfg.kv_lora_rank], w["kv_a_layernorm.weight"], eps)
        k_rope = reference_rope(kv_a[:, cfg.kv_lora_rank:], angles, factor)  # one rope key for all heads
        kv_all = latent @ w["kv_b_proj.weight"].T
        head_outputs = []
        for h in range(heads):
            q_h = q_all[:, h * (nope + rope):(h + 1) * (nope + rope)]          # rows per head: nope then rope
            q_h = torch.cat([q_h[:, :nope], reference_rope(q_h[:, nope:], angles, factor)], dim=-1)
            kv_h = kv_all[:, h * (nope + vd):(h + 1) * (nope + vd)]            # rows per head: k_nope then v
            k_h = torch.cat([kv_h[:, :nope], k_rope], dim=-1)
            v_h = kv_h[:, nope:]
            logits = torch.full((s, s), float("-inf"), dtype=torch.float64)
            for i in range(s):
                for j in range(i + 1):                                        # causal: keys up to the query
                    logits[i, j] = (q_h[i] * k_h[j]).sum() * scale
            head_outputs.append(torch.softmax(logits, dim=-1) @ v_h)
        out[bi] = torch.cat(head_outputs, dim=-1) @ w["o_proj.weight"].T
    return out


@pytest.mark.parametrize("q_lora_rank", [24, 0])
@pytest.mark.parametrize("yarn", [False, True])
def test_mla_equals_naive_per_head_attention(q_lora_rank, yarn):
    yarn_keys = dict(rope_factor=4.0, original_max_position_embeddings=64, mscale=0.9, mscale_all_dim=0.7,
                     beta_fast=32.0, beta_slow=1.0) if yarn else {}
    cfg = small_model_config(q_lora_rank=q_lora_rank, qk_rope_head_dim=16, **yarn_keys)
    g = torch.Generator().manual_seed(0)
    attn = MLA(cfg)
    randomize(attn, g)
    x = torch.randn(2, 11, cfg.hidden_size, generator=g)
    cos, sin = rope_cos_sin(cfg, x.shape[1])
    out = attn(x, cos, sin)
    expected = naive_mla(attn, cfg, x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    if yarn:   # the YaRN ramp really blends: some pairs keep their frequency, some are divided by the factor
        angles, _ = reference_rope_angles(cfg, 2)
        plain = torch.tensor([cfg.rope_theta ** (-2 * j / cfg.qk_rope_head_dim) for j in range(cfg.qk_rope_head_dim // 2)],
                             dtype=torch.float64)
        ratio = angles[1] / plain
        assert ratio[0] == 1.0 and math.isclose(ratio[-1].item(), 1 / cfg.rope_factor, rel_tol=1e-9)


YARN_KEYS = ("rope_factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast", "beta_slow")


def test_softmax_scale_of_the_released_config():
    """(qk_nope + qk_rope)^-0.5 * mscale^2 = 0.13523 for DeepSeek-V3 (factor 40, mscale_all_dim 1)."""
    cfg = load_config("configs/v3-671b.yaml").model
    attn_scale = reference_softmax_scale(cfg)
    assert round(attn_scale, 5) == 0.13523
    assert math.isclose(MLA(small_model_config(**{k: getattr(cfg, k) for k in YARN_KEYS}, qk_nope_head_dim=128,
                                               qk_rope_head_dim=64)).scale, attn_scale, rel_tol=1e-12)


# ----------------------------------------------------------------------------- the router

def router_with_logits(n_experts: int, n_group: int, topk_group: int, top_k: int, scaling: float = 2.5) -> Router:
    """A router whose gate logits equal its input (weight = identity, hidden = experts)."""
    cfg = small_model_config(hidden_size=n_experts, n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group,
                             num_experts_per_tok=top_k, routed_scaling_factor=scaling)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(n_experts))
    return router


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def reference_route(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                    scaling: float) -> tuple[list[set], list[dict]]:
    """Per token: groups ranked by the sum of their two best biased scores, experts of the kept
    groups ranked by biased score, weights from unbiased scores normalised over the chosen ones."""
    n = scores.shape[1]
    per_group = n // n_group
    chosen, weights = [], []
    for t in range(scores.shape[0]):
        biased = [scores[t, e].item() + bias[e].item() for e in range(n)]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for e in range(n) if e // per_group in kept]
        top = sorted(candidates, key=lambda e: -biased[e])[:top_k]
        total = sum(scores[t, e].item() for e in top)
        chosen.append(set(top))
        weights.append({e: scores[t, e].item() / total * scaling for e in top})
    return chosen, weights


def check_router(router: Router, x: torch.Tensor, expected: list[set]) -> None:
    ids, weights, scores = router(x)
    ref_ids, ref_weights = reference_route(torch.sigmoid(x.double()), router.e_score_correction_bias.double(),
                                           router.n_group, router.topk_group, router.top_k, router.scaling)
    assert [set(row.tolist()) for row in ids] == ref_ids == expected
    for t in range(x.shape[0]):
        got = {int(e): w.item() for e, w in zip(ids[t], weights[t])}
        assert got.keys() == ref_weights[t].keys()
        for e, w in ref_weights[t].items():
            assert math.isclose(got[e], w, rel_tol=1e-5)


def test_router_selects_on_biased_scores_but_weights_with_unbiased_scores():
    router = router_with_logits(n_experts=4, n_group=1, topk_group=1, top_k=2)
    x = logits_of([[0.9, 0.8, 0.7, 0.1]])
    check_router(router, x, [{0, 1}])
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))   # bias pushes expert 3 in
    check_router(router, x, [{0, 3}])
    _, weights, _ = router(x)
    # the gate weights are 0.9 / (0.9 + 0.1) and 0.1 / (0.9 + 0.1), times 2.5: the bias never enters them
    assert sorted(weights[0].tolist()) == pytest.approx([0.25, 2.25], rel=1e-5)


def test_router_masked_group_never_contributes_an_expert():
    # 8 experts in 4 groups of 2, keep 2 groups, 2 experts per token.
    router = router_with_logits(n_experts=8, n_group=4, topk_group=2, top_k=2)
    # Expert 0 has the highest single score, but its group sums its top-2 to 0.99 + 0.01 = 1.0,
    # below groups 1 (1.2) and 2 (1.1): group 0 is masked and expert 0 must not be chosen.
    x = logits_of([[0.99, 0.01, 0.6, 0.6, 0.56, 0.54, 0.1, 0.1]])
    check_router(router, x, [{2, 3}])
    # All biased scores negative: masked experts must sit at -inf, not 0, or they would be chosen.
    router.e_score_correction_bias.fill_(-2.0)
    check_router(router, x, [{2, 3}])
    # The bias moves a group in: +0.6 on both of group 3's experts makes it score 1.4, the best group.
    router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0.6, 0.6]))
    check_router(router, x, [{6, 7}])
    router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0.45, 0.0]))
    # group 3 = 0.55 + 0.1 = 0.65 stays masked, though expert 6's biased 0.55 beats expert 5's 0.54
    check_router(router, x, [{2, 3}])


def test_router_matches_reference_on_random_tokens():
    g = torch.Generator().manual_seed(1)
    router = router_with_logits(n_experts=16, n_group=4, topk_group=2, top_k=3)
    router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.3)
    x = torch.randn(64, 16, generator=g) * 2
    ids, _, _ = router(x)
    expected, _ = reference_route(torch.sigmoid(x.double()), router.e_score_correction_bias.double(), 4, 2, 3, 2.5)
    check_router(router, x, expected)
    assert all(len({e // 4 for e in row.tolist()}) <= 2 for row in ids)


# ----------------------------------------------------------------------------- bias update

@pytest.mark.parametrize("recenter", [False, True])
def test_bias_update_moves_by_exactly_gamma(recenter):
    moe = MoE(small_model_config(n_routed_experts=4, n_group=1, topk_group=1))
    start = torch.tensor([0.1, -0.2, 0.05, 0.3])
    moe.gate.e_score_correction_bias.copy_(start)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])                        # mean 5: expert 0 overloaded, others under
    moe.update_bias(load, gamma=0.01, recenter=recenter)
    expected = start + torch.tensor([-0.01, 0.01, 0.01, 0.01])
    if recenter:
        expected = expected - expected.mean()
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected, rtol=0, atol=1e-7)
    balanced = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(torch.full((4,), 5.0), gamma=0.01, recenter=recenter)   # at the mean: no move
    torch.testing.assert_close(moe.gate.e_score_correction_bias, balanced, rtol=0, atol=1e-7)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_expert_load_counts_grad_enabled_forwards_only():
    cfg = small_model_config(hidden_size=8, n_routed_experts=8)
    moe = MoE(cfg)
    randomize(moe, torch.Generator().manual_seed(2))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    ids, _, _ = moe.gate(x.reshape(-1, 8))
    moe(x)
    with torch.no_grad():
        moe(x)
    torch.testing.assert_close(moe.expert_load, torch.bincount(ids.flatten(), minlength=8).float())


# ----------------------------------------------------------------------------- sequence-wise balance loss

def test_sequence_balance_loss_equals_report_formula():
    alpha = 0.01
    cfg = small_model_config(hidden_size=4, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
                             moe_intermediate_size=4)
    moe = MoE(cfg)
    randomize(moe, torch.Generator().manual_seed(4))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))
    # Each token's affinities sum to 2, so s'_{i,t} = s_{i,t} / 2.
    s1, s2, s3 = [0.8, 0.6, 0.2, 0.4], [0.1, 0.7, 0.9, 0.3], [0.3, 0.2, 0.6, 0.9]
    x = torch.stack([logits_of([s1, s2, s3]), logits_of([s1, s1, s1])])        # [2 sequences, 3 tokens, 4]
    # Sequence 1 selects {0,1}, {1,2}, {2,3}: counts [1, 2, 2, 1]; f_i = N_r / (K_r T) * count = 4/6 * count;
    # P = mean of s' = [0.6, 0.75, 0.85, 0.8] / 3.   Sequence 2 selects {0,1} thrice: counts [3, 3, 0, 0],
    # P = [0.4, 0.3, 0.1, 0.2].   L = alpha * sum_i f_i P_i, averaged over the two sequences.
    seq1 = (4 / 6) * (1 * 0.6 + 2 * 0.75 + 2 * 0.85 + 1 * 0.8) / 3
    seq2 = (4 / 6) * (3 * 0.4 + 3 * 0.3)
    expected = alpha * (seq1 + seq2) / 2
    moe.balance_alpha = alpha
    out = moe(x)
    assert math.isclose(moe.last_balance_loss.item(), expected, rel_tol=1e-5)

    # The loss reaches the router weights in backward: its gradient is the gradient of the formula.
    out.sum().backward()
    with_loss = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.balance_alpha = 0.0
    moe(x).sum().backward()
    without_loss = moe.gate.weight.grad.clone()
    weight = moe.gate.weight.detach().clone().requires_grad_(True)
    scores = torch.sigmoid(x @ weight.T)                                         # [2, 3, 4]
    counts = torch.tensor([[1.0, 2, 2, 1], [3, 3, 0, 0]])
    f = 4 / (2 * 3) * counts
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    (alpha * (f * p).sum(-1).mean()).backward()
    assert weight.grad.abs().max() > 0
    torch.testing.assert_close(with_loss - without_loss, weight.grad, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- multi-token prediction

def test_mtp_sees_shifted_embeddings_and_predicts_shifted_targets():
    cfg = small_model_config(mtp_depth=2)
    model = DeepSeekV3(cfg)
    g = torch.Generator().manual_seed(5)
    model.init_weights(g)
    for layer in model.mtp.values():   # distinct norm weights, so swapping the halves of the concatenation shows
        with torch.no_grad():
            layer.enorm.weight.copy_(torch.rand(cfg.hidden_size, generator=g) + 0.5)
            layer.hnorm.weight.copy_(torch.rand(cfg.hidden_size, generator=g) + 0.5)
    b, s = 2, 10
    stream = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    tokens, targets = stream[:, :-1], stream[:, 1:]

    seen = {}
    for k, layer in enumerate(model.mtp.values(), start=1):
        layer.register_forward_hook(lambda mod, args, out, k=k: seen.update({("args", k): args, ("out", k): out}))
        layer.eh_proj.register_forward_hook(lambda mod, args, out, k=k: seen.update({("eh_in", k): args[0]}))
    main_hidden = {}
    last = list(model.layers.values())[-1]
    last.register_forward_hook(lambda mod, args, out: main_hidden.update(h=out))

    lam = 0.3
    out = model(tokens, targets, mtp_weight=lam)
    emb = model.embed_tokens.weight.detach()
    losses = []
    previous = main_hidden["h"]
    for k, layer in enumerate(model.mtp.values(), start=1):
        hidden, embedded = seen[("args", k)][:2]
        valid = s - k
        # depth k at position i sees h^{k-1}_i and emb(t_{i+k})
        torch.testing.assert_close(hidden, previous)
        torch.testing.assert_close(embedded[:, :valid], emb[stream[:, k:k + valid]])
        # eh_proj's input: cat(enorm(embedding), hnorm(hidden)), embedding first
        reference_in = torch.cat([rms_norm(embedded, layer.enorm.weight, cfg.rms_norm_eps),
                                  rms_norm(hidden, layer.hnorm.weight, cfg.rms_norm_eps)], dim=-1)
        torch.testing.assert_close(seen[("eh_in", k)], reference_in)
        # it predicts t_{i+k+1}; positions whose target lies past the stream are masked out of the loss
        h_k = seen[("out", k)]
        logits = rms_norm(h_k, layer.norm.weight, cfg.rms_norm_eps) @ model.lm_head.weight.T    # the shared head
        log_probs = torch.log_softmax(logits[:, :valid].double(), dim=-1)
        picked = log_probs.gather(-1, stream[:, k + 1:k + 1 + valid].unsqueeze(-1))
        losses.append(-picked.sum() / (b * s))      # report eq. 24: 1/T over the sequence
        previous = h_k
    main_logits = rms_norm(main_hidden["h"], model.norm.weight, cfg.rms_norm_eps) @ model.lm_head.weight.T
    lm = F.cross_entropy(main_logits.flatten(0, 1).double(), targets.flatten())
    mtp = torch.stack(losses).mean()
    torch.testing.assert_close(out.mtp_loss.double(), mtp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.lm_loss.double(), lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), lm + lam * mtp, rtol=1e-5, atol=1e-6)


def test_mtp_loss_ignores_tokens_past_the_end_of_the_shifted_sequence():
    """Depth 1's last position would need t_{s+1}, past the stream; a shifted-by-roll target there is
    targets[0], so changing targets[0] changes the main loss but must leave the MTP loss alone."""
    cfg = small_model_config(mtp_depth=1)
    model = DeepSeekV3(cfg)
    g = torch.Generator().manual_seed(6)
    model.init_weights(g)
    stream = torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    tokens, targets = stream[:, :-1], stream[:, 1:]
    base = model(tokens, targets, mtp_weight=1.0)
    changed = targets.clone()
    changed[0, 0] = (changed[0, 0] + 1) % cfg.vocab_size
    out = model(tokens, changed, mtp_weight=1.0)
    assert out.mtp_loss.item() == base.mtp_loss.item() and out.lm_loss.item() != base.lm_loss.item()


# ----------------------------------------------------------------------------- parameter counts

def test_parameter_count_formula_matches_a_built_model():
    cfg = small_model_config(num_layers=3, mtp_depth=1)
    model = DeepSeekV3(cfg)
    built = sum(p.numel() for p in model.parameters())
    counts = count_parameters(cfg)
    assert counts["total_with_mtp"] == built
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    assert counts["total"] == main
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    assert counts["active"] == main - unused


def test_parameter_counts_at_scale():
    """671B total / 37B activated (DeepSeek-V3 report), MTP excluded.

    count_parameters' "active" counts every weight a token uses, input embedding included
    (37.55B). DeepSeek's activated figures leave the input embedding out: the same definition
    gives DeepSeek-V2-Lite's published 15.7B total / 2.4B activated (2.45B, checked below; with
    the embedding it would be 2.66B), and for V3 gives 36.63B, which rounds to the published 37B
    (-1.01%: the published figure is rounded to the billion). The released checkpoint's 685B
    is the 671B plus the MTP module with its own copies of the embedding and head.
    """
    v3 = count_parameters(load_config("configs/v3-671b.yaml").model)
    assert abs(v3["total"] / 671e9 - 1) < 0.01
    activated = v3["active"] - v3["embedding"]
    assert round(activated / 1e9) == 37 and abs(activated / 37e9 - 1) < 0.011
    assert abs((v3["total_with_mtp"] + 2 * v3["embedding"]) / 685e9 - 1) < 0.01

    v2_lite = load_config("configs/v3-16b.yaml", ["model.vocab_size=102400", "model.mtp_depth=0"]).model
    lite = count_parameters(v2_lite)
    assert abs(lite["total"] / 15.7e9 - 1) < 0.01
    assert abs((lite["active"] - lite["embedding"]) / 2.4e9 - 1) < 0.025        # 2.45B, published as 2.4B

    v16 = count_parameters(load_config("configs/v3-16b.yaml").model)
    assert abs(v16["total"] / 16e9 - 1) < 0.02
