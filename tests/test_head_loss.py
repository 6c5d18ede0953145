"""The fused output head + cross-entropy (megads/model/head_loss.py) against the plain head: the
same per-token losses and gradients in fp32 (to rounding) and under bf16 autocast (to bf16
rounding), with chunks that do not divide the tokens; and in the model, as `train.head_loss`."""
import pytest
import torch
import torch.nn.functional as F

from megads.config import ConfigError, load_config
from megads.model.head_loss import linear_cross_entropy
from megads.parallel.builder import build_model
from megads.parallel.mesh import Mesh


def plain(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, reduction="none")


def losses_and_grads(fn, x, w, t, grad):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    losses = fn(x, w, t)
    (losses * grad).sum().backward()
    return losses.detach(), x.grad, w.grad


def assert_close(a, b, rel, what):
    scale = b.abs().max().clamp(min=1e-12)
    assert (a - b).abs().max() <= rel * scale, f"{what}: {(a - b).abs().max():.3e} > {rel} x {scale:.3e}"


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_fused_head_equals_the_plain_head_in_fp32(rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g) * 0.5
    t, grad = torch.randint(0, 300, (50,), generator=g), torch.rand(50, generator=g)
    fused = losses_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, rows), x, w, t, grad)
    for got, want, what in zip(fused, losses_and_grads(plain, x, w, t, grad), ("losses", "dx", "dW")):
        assert got.dtype == want.dtype
        assert_close(got, want, 1e-5, what)


def test_fused_head_under_bf16_autocast_matches_the_plain_head_to_bf16_rounding():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 32, generator=g), torch.randn(500, 32, generator=g) * 0.2
    t, grad = torch.randint(0, 500, (40,), generator=g), torch.full((40,), 1 / 40)

    def under_autocast(fn):
        def run(a, b, c):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(a, b, c)
        return run
    fused = losses_and_grads(under_autocast(lambda a, b, c: linear_cross_entropy(a, b, c, 16)), x, w, t, grad)
    reference = losses_and_grads(under_autocast(lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c,
                                                                                reduction="none")), x, w, t, grad)
    for got, want, what in zip(fused, reference, ("losses", "dx", "dW")):
        assert got.dtype == want.dtype, what                    # fp32 losses, fp32 gradients for fp32 leaves
        assert_close(got, want, 2e-2, what)                     # bf16 has 8 bits of mantissa


def test_the_model_with_the_fused_head_trains_as_with_the_plain_one():
    def run(head_loss):
        cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "model.num_layers=2", f"train.head_loss={head_loss}"])
        model = build_model(cfg.validate(1), Mesh(), torch.device("cpu")).model
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        out = model(tokens[:, :-1], tokens[:, 1:], 0.3)
        out.loss.backward()
        return model, torch.stack([out.lm_loss, out.mtp_loss]).detach(), \
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    fused_model, fused, fused_grads = run("fused")
    plain_model, plain_losses, plain_grads = run("plain")
    assert fused_model.strategy.fused_head and not plain_model.strategy.fused_head
    assert_close(fused, plain_losses, 1e-6, "LM and MTP losses")
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        assert_close(grad, plain_grads[name], 1e-4, name)


def test_the_fused_head_is_refused_where_tp_splits_the_vocabulary():
    with pytest.raises(ConfigError, match="train.head_loss=fused takes the whole vocabulary"):
        load_config("configs/tiny.yaml", ["parallel.tp=2", "train.head_loss=fused"]).validate(2)
