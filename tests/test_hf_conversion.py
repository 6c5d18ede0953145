"""Conversion to and from the HuggingFace DeepseekV3 layout.

A small random model (1 dense + 2 MoE layers, MTP depth 1, query compression, YaRN, routed
scaling, random router biases) is saved by megads, exported, and loaded by `transformers`;
its fp32 logits must equal megads' within 1e-5 relative. Importing the export and exporting
again must reproduce every file bit for bit, in one shard or in several (streaming with a
small shard size); FP8 export must store the released layout and import back to the
blockwise-dequantised weights. Broken inputs fail with errors that name the tensor.
"""
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from megads.checkpoint import CheckpointError, CheckpointReader, load_model_weights, save_checkpoint
from megads.checkpoint.convert import from_hf, reshard, to_hf
from megads.checkpoint.hf import config_from_metadata, dequantise_weight, hf_config, model_config, quantise_weight
from megads.config import ModelConfig
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.plan import whole_model_plan

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=3, first_k_dense=1, intermediate_size=128,
                     moe_intermediate_size=32, num_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=40.0,
                     original_max_position_embeddings=64, max_position_embeddings=4096, mtp_depth=1, init_std=0.08)


class NoOptimizer:
    """A model saved before any update: no optimizer state."""

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = DeepSeekV3(CONFIG)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)                                  # norms: not all ones
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.05)       # selection differs from the scores
    ckpt = save_checkpoint(str(root / "megads"), 7, model, NoOptimizer(), whole_model_plan(model), {"step": 7}, keep_last=1,
                           metadata={"model_config": CONFIG.__dict__})
    return root, model, ckpt


def test_transformers_logits_match(exported):
    from transformers import DeepseekV3ForCausalLM
    root, model, ckpt = exported
    summary = to_hf(ckpt, str(root / "fp32"), dtype=torch.float32)
    assert summary["mtp_layers"] == 1
    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(root / "fp32"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])   # MTP: not implemented there
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        ours = model.logits(model.hidden_states(tokens))
        theirs = hf(tokens).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-5, f"logits differ: max relative difference {rel:.2e}"


def test_round_trip_is_bitwise_and_keeps_mtp(exported):
    root, model, ckpt = exported
    first, back, second = root / "bf16", root / "back", root / "bf16-again"
    to_hf(ckpt, str(first))
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "from-hf", str(first), str(back)], check=True,
                            capture_output=True, text=True)
    assert "from-hf: wrote" in result.stdout and "shared_copies_checked=2" in result.stdout
    to_hf(str(back), str(second))
    assert sorted(os.listdir(first)) == sorted(os.listdir(second))
    match, mismatch, errors = filecmp.cmpfiles(first, second, os.listdir(first), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    with open(first / "model.safetensors.index.json") as f:
        names = json.load(f)["weight_map"]
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.embed_tokens.weight",
            "model.layers.3.shared_head.head.weight", "model.layers.3.mlp.experts.7.down_proj.weight"} <= set(names)
    reloaded = DeepSeekV3(CONFIG)
    load_model_weights(str(back), reloaded)
    for name, value in model.state_dict().items():
        expected = value if name.endswith("e_score_correction_bias") else value.to(torch.bfloat16).float()
        assert torch.equal(reloaded.state_dict()[name], expected), name
    assert CheckpointReader(str(back)).metadata["step"] == 0


def test_fp8_export_and_dequantised_import(exported):
    root, model, ckpt = exported
    to_hf(ckpt, str(root / "fp8"), fp8=True)
    with open(root / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(root / "fp8" / "model-00001-of-00001.safetensors"), framework="pt") as f:
        w8 = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")                   # [256, 32]
        scale = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight_scale_inv")
        assert w8.dtype == torch.float8_e4m3fn and scale.shape == (2, 1) and scale.dtype == torch.float32
        assert f.get_tensor("model.layers.3.eh_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    from_hf(str(root / "fp8"), str(root / "fp8-back"), dequant_dtype=torch.float32)
    reader = CheckpointReader(str(root / "fp8-back"))
    for name in ("layers.1.self_attn.kv_b_proj.weight", "mtp.0.layer.self_attn.o_proj.weight"):
        w = model.state_dict()[name]
        assert torch.equal(reader.read("model." + name), dequantise_weight(*quantise_weight(w), name)), name
    experts = model.state_dict()["layers.2.mlp.experts.up_proj"]
    got = reader.read("model.layers.2.mlp.experts.up_proj")
    assert all(torch.equal(got[j], dequantise_weight(*quantise_weight(experts[j]), "e")) for j in range(8))
    assert (got - experts).abs().max() <= experts.abs().max() / 8                # e4m3: 3 mantissa bits


def test_dequantise_handles_partial_blocks():
    w = torch.randn(200, 130)
    w8, scale = quantise_weight(w)
    assert w8.shape == (200, 130) and scale.shape == (2, 2)
    assert ((dequantise_weight(w8, scale, "w") - w).abs() <= w.abs().max() / 8).all()
    with pytest.raises(ValueError, match="w_scale_inv has shape \\[1, 2\\], expected \\[2, 2\\]"):
        dequantise_weight(w8, scale[:1], "w")


def test_reshard_recuts_pieces(exported):
    root, model, ckpt = exported
    out = root / "tp2ep4"
    reshard(ckpt, str(out), tp=2, ep=4)
    reader = CheckpointReader(str(out))
    assert len(reader.tensors["model.layers.1.mlp.experts.gate_proj"]["pieces"]) == 4
    assert len(reader.tensors["model.embed_tokens.weight"]["pieces"]) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(reader.read("model." + name), value), name


def export_without(ckpt: str, out, tensor: str) -> None:
    """An HF export of `ckpt` into `out` whose index lacks `tensor`."""
    to_hf(ckpt, str(out), dtype=torch.float32)
    index_path = out / "model.safetensors.index.json"
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"][tensor]
    with open(index_path, "w") as f:
        json.dump(index, f)


def test_broken_hf_checkpoint_names_the_tensor(exported, tmp_path):
    root, model, ckpt = exported
    export_without(ckpt, tmp_path / "hf", "model.layers.2.mlp.experts.5.gate_proj.weight")
    with pytest.raises(CheckpointError, match=r"no tensor model\.layers\.2\.mlp\.experts\.5\.gate_proj\.weight"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert not os.path.exists(tmp_path / "back")


SHARD = 128 << 10          # the bf16 export is ~0.7 MiB: several shards, each tensor (<= 32 KiB) fits one


def weight_map(hf_dir):
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def test_streaming_conversion_writes_several_shards_and_round_trips(exported):
    root, model, ckpt = exported
    first, back, second = root / "sharded", root / "sharded-back", root / "sharded-again"
    summary = to_hf(ckpt, str(first), max_shard_bytes=SHARD)
    names = weight_map(first)
    files = sorted(set(names.values()))
    assert summary["files"] == len(files) >= 4
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for file in files:
        with safe_open(str(first / file), framework="pt") as f:
            assert set(f.keys()) == {name for name, shard in names.items() if shard == file}, file
            assert sum(t.numel() * t.element_size() for t in map(f.get_tensor, f.keys())) <= SHARD, file
    from_hf(str(first), str(back), max_file_bytes=SHARD)
    assert len(CheckpointReader(str(back)).files) >= 4
    to_hf(str(back), str(second), max_shard_bytes=SHARD)
    assert sorted(os.listdir(first)) == sorted(os.listdir(second))
    match, mismatch, errors = filecmp.cmpfiles(first, second, os.listdir(first), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_truncated_hf_file_names_the_tensor_and_file(exported, tmp_path):
    root, model, ckpt = exported
    to_hf(ckpt, str(tmp_path / "hf"), max_shard_bytes=SHARD)
    file = tmp_path / "hf" / weight_map(tmp_path / "hf")["model.embed_tokens.weight"]     # the first tensor read
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read tensor model.embed_tokens.weight from {file} (") +
                       r".*\): the file is truncated or damaged"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert not os.path.exists(tmp_path / "back")


RELEASED = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
            "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000, "max_position_embeddings": 163840,
            "num_nextn_predict_layers": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}}


def test_released_config_maps_both_ways():
    cfg = model_config(RELEASED)
    assert (cfg.num_layers, cfg.first_k_dense, cfg.q_lora_rank, cfg.mtp_depth, cfg.rope_factor, cfg.mscale_all_dim,
            cfg.original_max_position_embeddings, cfg.n_group, cfg.topk_group) == (61, 3, 1536, 1, 40.0, 1.0, 4096, 8, 4)
    written = hf_config(cfg, torch.bfloat16, fp8=True)
    for key, value in RELEASED.items():
        if key == "rope_scaling":
            assert {k: written[key][k] for k in value} == value
        elif key not in ("quantization_config",):
            assert written[key] == value, key
    assert written["quantization_config"]["weight_block_size"] == [128, 128]
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        model_config({**RELEASED, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_scaling.truncate=false is not supported"):
        model_config({**RELEASED, "rope_scaling": {**RELEASED["rope_scaling"], "truncate": False}})


# ----------------------------------------------------------------------------- models saved by transformers

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
               num_experts_per_tok=2, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
               v_head_dim=32, first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
SEQ = 96                   # beyond original_max_position_embeddings: YaRN's frequencies and factors matter


def saved_by_transformers(path, rope_parameters: dict):
    """A tiny DeepseekV3ForCausalLM as `transformers` builds and saves it: config.json says
    num_nextn_predict_layers=1 (the class default) but no MTP tensor is written."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_HF, rope_parameters=dict(rope_parameters))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for layer in model.model.layers[TINY_HF["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    model.save_pretrained(str(path))
    return model


def imported_logits(hf_dir, out, tokens: torch.Tensor) -> torch.Tensor:
    """from-hf, then megads' fp32 logits [b, s, V] of the imported checkpoint."""
    from_hf(str(hf_dir), str(out), dequant_dtype=torch.float32)
    model = DeepSeekV3(config_from_metadata(CheckpointReader(str(out)).metadata))
    load_model_weights(str(out), model)
    model.eval()
    with torch.no_grad():
        return model.logits(model.hidden_states(tokens))


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_model_saved_by_transformers_imports_without_mtp(tmp_path, caplog):
    hf = saved_by_transformers(tmp_path / "hf", YARN)
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="megads"):
        ours = imported_logits(tmp_path / "hf", tmp_path / "back", tokens)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "num_nextn_predict_layers=1" in warnings[0] and "dropped" in warnings[0], warnings
    assert CheckpointReader(str(tmp_path / "back")).metadata["model_config"]["mtp_depth"] == 0
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert relative_gap(ours, theirs) <= 1e-5


def test_partial_mtp_tensors_stay_an_error(exported, tmp_path):
    root, model, ckpt = exported
    export_without(ckpt, tmp_path / "hf", "model.layers.3.enorm.weight")
    with pytest.raises(CheckpointError, match=r"no tensor model\.layers\.3\.enorm\.weight \(megads mtp\.0\.enorm"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))


@pytest.mark.parametrize("rope", [
    {},                                                          # no mscale: transformers scales cos/sin by mscale(4)
    {"mscale": 1.0, "mscale_all_dim": 1.0},                      # the release's
    {"mscale_all_dim": 1.0},                                     # softmax scaled, cos/sin by mscale(4)
    {"mscale": 0.707},                                           # mscale alone is ignored
    {"mscale": 0.707, "mscale_all_dim": 0.5},                    # cos/sin by their ratio
    {"mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.3},
], ids=["no-mscale", "release", "mscale_all_dim-only", "mscale-only", "ratio", "attention_factor"])
def test_yarn_attention_factors_match_transformers_both_ways(tmp_path, rope):
    """Logits of a transformers model equal megads' after from-hf, and transformers' after to-hf of
    that import, for every way rope_scaling can give (or leave out) YaRN's attention factors."""
    from transformers import DeepseekV3ForCausalLM
    hf = saved_by_transformers(tmp_path / "hf", {**YARN, **rope})
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = imported_logits(tmp_path / "hf", tmp_path / "back", tokens)
    assert relative_gap(ours, theirs) <= 1e-4, f"from-hf: logits differ by {relative_gap(ours, theirs):.2e}"
    to_hf(str(tmp_path / "back"), str(tmp_path / "again"), dtype=torch.float32)
    with open(tmp_path / "again" / "config.json") as f:                   # what to-hf writes reads back the same
        assert model_config(json.load(f)) == config_from_metadata(CheckpointReader(str(tmp_path / "back")).metadata)
    again = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "again"), dtype=torch.float32).eval()
    with torch.no_grad():
        gap = relative_gap(again(tokens).logits, theirs)
    assert gap <= 1e-4, f"to-hf: logits differ by {gap:.2e}"
