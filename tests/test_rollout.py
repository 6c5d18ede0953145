"""KV-cached generation: the cached decode is the full forward, sampling follows its definition,
responses stop at eos or the length limit, and the recorded log-probs and expert choices line
up with the training forward (routing replay)."""
import pytest
import torch
import torch.nn.functional as F

from megads.config import load_config
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.layers import LinearStrategy
from megads.parallel.mesh import Mesh
from megads.rl.policy import capture_routes, replay_routes, token_logprobs
from megads.rl.rollout import SamplingParams, UniformStream, generate, sample_tokens

EOS, PAD = 3, 0
SMALL = ["model.hidden_size=32", "model.num_layers=3", "model.intermediate_size=64", "model.moe_intermediate_size=16",
         "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
         "model.v_head_dim=8", "model.vocab_size=64", "model.mtp_depth=0"]


def small_model(seed=0, std=0.3):
    cfg = load_config("configs/tiny.yaml", SMALL).validate().model
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_cached_decode_matches_full_forward():
    model = small_model()
    tokens = torch.randint(4, 64, (3, 10))
    lens = torch.tensor([4, 6, 3])
    with torch.no_grad():
        full = model.logits(model.hidden_states(tokens))                        # [3, 10, V]
        cache = model.new_cache(3, 10, tokens.device, torch.float32)
        prefill = model.decode(tokens[:, :6], torch.arange(6).expand(3, -1), cache)
        for i in range(3):                                                       # ragged prompts, right-padded
            torch.testing.assert_close(prefill[i, :lens[i]], full[i, :lens[i]], atol=2e-5, rtol=1e-5)
        pos = lens.clone()
        rows = torch.arange(3)
        for _ in range(4):                                                       # one token per sequence per step
            step = model.decode(tokens[rows, pos][:, None], pos[:, None], cache)[:, 0]
            torch.testing.assert_close(step, full[rows, pos], atol=2e-5, rtol=1e-5)
            pos += 1
    assert cache["0"].latent.shape == (3, 10, model.cfg.kv_lora_rank)             # only latent + rope key cached
    assert cache["0"].k_rope.shape == (3, 10, model.cfg.qk_rope_head_dim)


def test_sampling_follows_inverse_cdf_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(1, temperature=1.0, top_p=1.0)
    # cdf over tokens sorted by probability: 0.5, 0.8, 0.95, 1.0
    for u, expected in ((0.1, 0), (0.6, 1), (0.9, 2), (0.99, 3)):
        token, logp = sample_tokens(logits, torch.tensor([u]), params)
        assert token.item() == expected
        assert logp.item() == pytest.approx(logits[0, expected].item(), abs=1e-6)
    nucleus = SamplingParams(1, temperature=1.0, top_p=0.8)                   # keeps {0, 1}: mass 0.8
    for u, expected in ((0.6, 0), (0.7, 1), (0.999, 1)):
        assert sample_tokens(logits, torch.tensor([u]), nucleus)[0].item() == expected
    hot = SamplingParams(1, temperature=2.0)
    _, logp = sample_tokens(logits, torch.tensor([0.1]), hot)
    assert logp.item() == pytest.approx(F.log_softmax(logits / 2, -1)[0, 0].item(), abs=1e-6)
    greedy, _ = sample_tokens(logits, None, SamplingParams(1, temperature=0.0))
    assert greedy.item() == 0


def push_eos(model, amount):
    """Add `amount` to the eos logit through the output head's GEMM."""
    shift = torch.zeros(model.cfg.vocab_size)
    shift[EOS] = amount
    model.lm_head.strategy = LinearStrategy(gemm=lambda x, w: F.linear(x, w) + shift)


def test_generation_stops_at_eos_and_at_the_length_limit():
    model = small_model()
    batch = prompts(4)
    push_eos(model, 1e4)
    out = generate(model, batch, SamplingParams(8), EOS, PAD, Mesh(), UniformStream(0, 4, 0, torch.device("cpu")))
    assert out.response_lens.tolist() == [1, 1, 1, 1]
    assert [r for r in out.responses()] == [[EOS]] * 4
    push_eos(model, -1e4)
    out = generate(model, batch, SamplingParams(5), EOS, PAD, Mesh(), UniformStream(0, 4, 0, torch.device("cpu")))
    assert out.response_lens.tolist() == [5] * 4
    assert out.mask.sum().item() == 20
    for i, p in enumerate(batch):
        assert out.tokens[i, :len(p)].tolist() == p                              # prompt kept, response right after
        assert (out.tokens[i, len(p) + 5:] == PAD).all()


def test_sampling_does_not_depend_on_how_the_batch_is_split():
    model = small_model()
    batch = prompts(6)
    params = SamplingParams(6, temperature=1.0, top_p=0.9)
    whole = generate(model, batch, params, EOS, PAD, Mesh(), UniformStream(7, 6, 0, torch.device("cpu")))
    halves = [generate(model, batch[i:i + 3], params, EOS, PAD, Mesh(), UniformStream(7, 6, i, torch.device("cpu")))
              for i in (0, 3)]
    assert whole.responses() == halves[0].responses() + halves[1].responses()


def near_tie_router_model():
    """Router rows equal up to 1e-6, so that expert scores differ by about as much as the cached
    decode and the full forward differ in rounding: recomputing the routes flips some of them
    (what bf16 kernels or another inference engine do at scale)."""
    model = small_model(seed=3)
    with torch.no_grad():
        for moe in model.moe_layers():
            w = moe.gate.weight
            w.copy_(w[:1].expand_as(w) + 1e-6 * torch.randn_like(w))
    return model


def test_routing_replay_reproduces_the_rollout_logprobs():
    model = near_tie_router_model()
    batch = [p for p in prompts(8, seed=5) for _ in range(2)]
    out = generate(model, batch, SamplingParams(10, temperature=1.0), EOS, PAD, Mesh(),
                   UniformStream(11, len(batch), 0, torch.device("cpu")))
    assert set(out.routes) == {"1", "2"}                                        # the MoE decoder layers
    assert out.routes["1"].shape == (*out.mask.shape, model.cfg.num_experts_per_tok)
    with torch.no_grad(), replay_routes(model, out.routes), capture_routes(model) as used:
        replayed, _ = token_logprobs(model, out.tokens, 1.0)
    torch.testing.assert_close(used["1"].view_as(out.routes["1"]), out.routes["1"])
    gap = (replayed - out.logprobs).abs()[out.mask]
    assert gap.max() < 1e-5
    with torch.no_grad(), capture_routes(model) as chosen:
        free, _ = token_logprobs(model, out.tokens, 1.0)
    changed = (chosen["1"].view_as(out.routes["1"]).sort(-1).values != out.routes["1"].sort(-1).values).any(-1)
    free_gap = (free - out.logprobs).abs()[out.mask]
    assert changed[out.mask].any()                                             # routes differ without replay ...
    assert free_gap.max() > 100 * max(gap.max().item(), 1e-7)                  # ... and so do the log-probs
