"""`train.compile`: the builder compiles every decoder layer as its last step, the compiled model
computes what the eager one does, and the settings it has not been checked with are refused.
(CPU: torch.compile's aot_eager backend traces the layers as inductor would and runs the traced
graph eagerly; the GPU speed is in benchmarks/RESULTS.md.)"""
import pytest
import torch

from megads.config import ConfigError, load_config
from megads.model.block import DecoderLayer
from megads.parallel.builder import build_model
from megads.parallel.mesh import Mesh

TINY = ["parallel.tp=1", "model.num_layers=3", "train.seq_len=32"]


def losses_and_grads(compile_setting: str, backend: str = "aot_eager"):
    cfg = load_config("configs/tiny.yaml", TINY + [f"train.compile={compile_setting}"]).validate(1)
    built = build_model(cfg, Mesh(), torch.device("cpu"), compile_backend=backend)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):                                   # the second call runs the cached graphs
        built.model.zero_grad(set_to_none=True)
        out = built.model(tokens[:, :-1], tokens[:, 1:], 0.3)
        out.loss.backward()
        losses.append(out.loss.detach())
    grads = {n: p.grad for n, p in built.model.named_parameters() if p.grad is not None}
    return built, torch.stack(losses), grads


def test_compiled_layers_compute_what_eager_layers_do():
    torch._dynamo.reset()
    compiled, losses, grads = losses_and_grads("layers")
    eager, eager_losses, eager_grads = losses_and_grads("auto")          # auto: eager on CPU
    assert compiled.applied == ("compile",) and eager.applied == ()
    layers = [m for m in compiled.model.modules() if isinstance(m, DecoderLayer)]
    assert len(layers) == 4 and all(m._compiled_call_impl is not None for m in layers)   # 3 layers + MTP's
    assert all(m._compiled_call_impl is None for m in eager.model.modules() if isinstance(m, DecoderLayer))
    scale = eager_losses.abs().max()
    assert (losses - eager_losses).abs().max() <= 1e-5 * scale
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        ref = eager_grads[name]
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max().clamp(min=1e-12), name


@pytest.mark.parametrize("overrides, named", [
    (["parallel.tp=2"], "parallel.tp=2"),
    (["parallel.ep=2", "train.global_batch=16"], "parallel.ep=2"),
    (["fp8.enabled=true"], "fp8.enabled=true"),
    (["train.compile=everything"], "train.compile must be auto, layers or none"),
])
def test_settings_compiled_layers_are_not_checked_with_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config("configs/tiny.yaml", ["train.compile=layers", *overrides]).validate(2)


def test_post_training_runs_its_layers_eagerly():
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "train.compile=layers"]).validate(1)
    with pytest.raises(ConfigError, match="SFT and GRPO run their layers eagerly"):
        cfg.validate_generation_layout(1, 4)
