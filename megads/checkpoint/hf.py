"""The mapping between megads' model and HuggingFace's DeepseekV3 layout (the released weights).

Names: megads already uses the HuggingFace names inside a decoder layer, so the mapping is

    embed_tokens.weight                 model.embed_tokens.weight
    norm.weight, lm_head.weight         model.norm.weight, lm_head.weight
    layers.{i}.<rest>                   model.layers.{i}.<rest>
    layers.{i}.mlp.experts.<p> [E,o,i]  model.layers.{i}.mlp.experts.{j}.<p>.weight [o, i], j < E
    mtp.{k}.enorm / hnorm / eh_proj     model.layers.{L+k}.enorm / hnorm / eh_proj
    mtp.{k}.layer.<rest>                model.layers.{L+k}.<rest>
    mtp.{k}.norm.weight                 model.layers.{L+k}.shared_head.norm.weight
    (embed_tokens, lm_head copies)      model.layers.{L+k}.embed_tokens.weight, .shared_head.head.weight

with L = num_hidden_layers. MTP layers share megads' embedding and head; the files carry a copy
per MTP layer, as the released model does. Both use interleaved RoPE pairs, so no row
permutation is needed.

FP8 (the released layout): every attention, MLP and expert projection is float8_e4m3fn with
`<name>_scale_inv` fp32 [ceil(out/128), ceil(in/128)], a per-block multiplier (w = w8 * s).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from megads.config import ModelConfig
from megads.fp8.quant import QTensor, crop, dequantize, pad_last2, quantize_blocks, round_up
from megads.model.rope import attention_factor, yarn_mscale

log = logging.getLogger("megads")

EXPERTS = re.compile(r"^(?P<prefix>(.*\.)?mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
HF_EXPERT = re.compile(r"^(?P<prefix>(.*\.)?mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
QUANTISED = re.compile(r"\.(self_attn|mlp)\.(.*\.)?\w*proj(_with_mqa)?\.weight$")
BLOCK = 128


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the HuggingFace files, taken from megads tensor `source` (expert index `expert`)."""

    name: str
    source: str
    expert: int | None = None


def quantised(hf_name: str) -> bool:
    """Projections stored in FP8 by the released checkpoint (not eh_proj, the router or the head)."""
    return bool(QUANTISED.search(hf_name))


def _layer_prefix(name: str, cfg: ModelConfig) -> tuple[str, str] | None:
    """megads name -> (HF prefix of its layer, rest), for names inside decoder or MTP layers."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"model.layers.{parts[1]}.", ".".join(parts[2:])
    if parts[0] == "mtp":
        prefix = f"model.layers.{cfg.num_layers + int(parts[1])}."
        rest = ".".join(parts[2:])
        if rest.startswith("layer."):
            return prefix, rest[len("layer."):]
        return prefix, "shared_head.norm.weight" if rest == "norm.weight" else rest
    return None


def hf_tensors(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[HFTensor]:
    """The HuggingFace tensors made from megads tensor `name` (global shape `shape`)."""
    mtp_layers = [f"model.layers.{cfg.num_layers + k}." for k in range(cfg.mtp_depth)]
    if name == "embed_tokens.weight":
        return [HFTensor("model.embed_tokens.weight", name)] + [HFTensor(p + "embed_tokens.weight", name) for p in mtp_layers]
    if name == "lm_head.weight":
        return [HFTensor("lm_head.weight", name)] + [HFTensor(p + "shared_head.head.weight", name) for p in mtp_layers]
    if name == "norm.weight":
        return [HFTensor("model.norm.weight", name)]
    located = _layer_prefix(name, cfg)
    if located is None:
        raise ValueError(f"no HuggingFace name for megads tensor {name}")
    prefix, rest = located
    expert = EXPERTS.match(rest)
    if expert:
        return [HFTensor(f"{prefix}{expert['prefix']}.{j}.{expert['proj']}.weight", name, j) for j in range(shape[0])]
    return [HFTensor(prefix + rest, name)]


def megads_name(hf_name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """HuggingFace name -> (megads name, expert index or None); None for the MTP layers' copies
    of the embedding and head (megads shares them)."""
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        return hf_name.removeprefix("model."), None
    match = re.match(r"^model\.layers\.(\d+)\.(.*)$", hf_name)
    if match is None:
        raise ValueError(f"unexpected tensor {hf_name} in a DeepseekV3 checkpoint")
    index, rest = int(match[1]), match[2]
    expert, j = HF_EXPERT.match(rest), None
    if expert:
        rest, j = f"{expert['prefix']}.{expert['proj']}", int(expert["index"])
    if index < cfg.num_layers:
        return f"layers.{index}.{rest}", j
    k = index - cfg.num_layers
    if k >= cfg.mtp_depth:
        raise ValueError(f"tensor {hf_name}: layer {index} is beyond num_hidden_layers + num_nextn_predict_layers")
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        return f"mtp.{k}.{rest}", None
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight", None
    return f"mtp.{k}.layer.{rest}", j


def shared_copy_source(hf_name: str) -> str:
    """The main-model HF tensor an MTP layer's embedding / head copy must equal."""
    return "model.embed_tokens.weight" if hf_name.endswith("embed_tokens.weight") else "lm_head.weight"


# ----------------------------------------------------------------------------- FP8 blocks

def scale_name(hf_name: str) -> str:
    return hf_name + "_scale_inv"


def quantise_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [o, i] -> (e4m3 [o, i], fp32 scale_inv [ceil(o/128), ceil(i/128)]), w ~= w8 * scale per block."""
    q = quantize_blocks(w.float())
    return crop(q.data, *w.shape), q.scale.contiguous()


def dequantise_weight(w8: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    """The fp32 weight of an e4m3 [o, i] tensor and its 128x128 block multipliers."""
    rows, cols = w8.shape
    expected = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{scale_name(name)} has shape {list(scale_inv.shape)}, expected {list(expected)} for "
                         f"{name} {list(w8.shape)} in 128x128 blocks")
    padded = pad_last2(w8.float(), round_up(rows), round_up(cols))
    return crop(dequantize(QTensor(padded, scale_inv.float())), rows, cols)


# ----------------------------------------------------------------------------- config.json

def hf_config(cfg: ModelConfig, dtype: torch.dtype, fp8: bool = False) -> dict:
    """config.json for DeepseekV3ForCausalLM. YaRN keys are written in full when YaRN is on."""
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.first_k_dense, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_interleave": True,
        "max_position_embeddings": cfg.max_position_embeddings, "num_nextn_predict_layers": cfg.mtp_depth,
        "tie_word_embeddings": False, "attention_bias": False, "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rope_scaling": rope_scaling(cfg),
    }
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [BLOCK, BLOCK]}
    return config


def rope_scaling(cfg: ModelConfig) -> dict | None:
    """config.json's rope_scaling: every YaRN key, plus attention_factor where transformers would
    otherwise derive another cos/sin factor from mscale / mscale_all_dim than megads applies."""
    if cfg.rope_factor == 1 and cfg.rope_attention_factor == 1:
        return None
    rope = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor, "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale_all_dim, "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "original_max_position_embeddings": cfg.original_max_position_embeddings}
    if hf_attention_factor(rope, cfg.rope_factor) != attention_factor(cfg):
        rope["attention_factor"] = attention_factor(cfg)
    return rope


def hf_attention_factor(rope: dict, factor: float) -> float:
    """The factor transformers (5.x) puts on cos/sin for YaRN: attention_factor if given, else
    mscale(mscale) / mscale(mscale_all_dim) if both are given and non-zero, else mscale(factor)
    with mscale 1 — where DeepSeek's own code defaults mscale to 1 and mscale_all_dim to 0."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return yarn_mscale(factor, rope["mscale"]) / yarn_mscale(factor, rope["mscale_all_dim"])
    return yarn_mscale(factor, 1.0)


def yarn_settings(rope: dict, max_position_embeddings: int) -> dict:
    """ModelConfig's YaRN fields for a yarn rope_scaling, read as transformers reads it so that the
    imported model gives its logits: the softmax scale takes mscale(mscale_all_dim)^2 only when
    mscale_all_dim is non-zero; cos/sin take hf_attention_factor, as DeepSeek's ratio when that is
    how transformers computes it, else as rope_attention_factor with the ratio made 1."""
    if rope.get("truncate", True) is not True:
        raise ValueError("rope_scaling.truncate=false is not supported: megads rounds YaRN's correction range like "
                         "DeepSeek-V3; remove the key")
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = float(rope.get("factor") or max_position_embeddings / original)
    mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
    settings = dict(rope_factor=factor, original_max_position_embeddings=original, mscale_all_dim=mscale_all_dim,
                    beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1))
    if rope.get("attention_factor") is None and rope.get("mscale") and mscale_all_dim:
        return {**settings, "mscale": float(rope["mscale"])}
    return {**settings, "mscale": mscale_all_dim, "rope_attention_factor": hf_attention_factor(rope, factor)}


def model_config(hf: dict, tensor_names: Iterable[str] | None = None) -> ModelConfig:
    """megads' ModelConfig of a DeepseekV3 config.json (the released one, one megads wrote or one
    transformers wrote). With the names of the tensors in the files, MTP layers that config.json
    announces but the files lack are dropped (see without_absent_mtp)."""
    if hf.get("model_type") != "deepseek_v3":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; only deepseek_v3 converts")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"num_key_value_heads={hf['num_key_value_heads']} differs from num_attention_heads={heads}; "
                         f"MLA has one key/value head per query head")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope scaling {kind!r} is not supported (megads implements YaRN)")
    if hf.get("rope_interleave", True) is not True:
        raise ValueError("rope_interleave=false is not supported: megads rotates interleaved pairs like the release")
    defaults = ModelConfig()
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        first_k_dense=hf.get("first_k_dense_replace", 0), intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], num_heads=heads, q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0, num_experts_per_tok=hf["num_experts_per_tok"],
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), norm_topk_prob=hf.get("norm_topk_prob", True),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        **(yarn_settings(rope, hf["max_position_embeddings"]) if kind == "yarn" else {}),
        max_position_embeddings=hf["max_position_embeddings"], mtp_depth=hf.get("num_nextn_predict_layers", 0),
        init_std=float(hf.get("initializer_range", defaults.init_std)))
    return cfg if tensor_names is None else without_absent_mtp(cfg, tensor_names)


def without_absent_mtp(cfg: ModelConfig, tensor_names: Iterable[str]) -> ModelConfig:
    """cfg with mtp_depth=0, and a warning, when the files hold no tensor of a layer >= num_layers:
    transformers writes num_nextn_predict_layers=1 (its default) but never MTP weights, so a model
    it saved would otherwise not import. Some MTP tensors but not all stay an error (from_hf)."""
    if cfg.mtp_depth == 0 or any(_layer_index(name) >= cfg.num_layers for name in tensor_names):
        return cfg
    log.warning(f"config.json says num_nextn_predict_layers={cfg.mtp_depth} but the files hold no tensor of "
                f"model.layers.{cfg.num_layers} or beyond: the MTP layers are absent (transformers does not save "
                f"them) and were dropped; importing with mtp_depth=0")
    return dataclasses.replace(cfg, mtp_depth=0)


def _layer_index(hf_name: str) -> int:
    """The decoder layer of a HuggingFace tensor name; -1 outside the layers."""
    match = re.match(r"^model\.layers\.(\d+)\.", hf_name)
    return int(match[1]) if match else -1


def config_from_metadata(metadata: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in metadata["model_config"].items() if k in fields})
