"""Typed configuration: dataclasses loaded from YAML plus dotted `key=value` overrides.

Everything is validated once, in `Config.validate`, before any process group
or file exists. Every error is a `ConfigError` whose one-line message names the
setting and says how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """DeepSeek-V3 shape. Names follow the HuggingFace DeepseekV3 config where one exists."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    first_k_dense: int = 1                 # the first k layers use a dense MLP
    intermediate_size: int = 384           # dense MLP width
    moe_intermediate_size: int = 64        # one routed / shared expert's width
    num_heads: int = 4
    q_lora_rank: int = 0                   # 0: no query compression (plain q_proj)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 1.0               # YaRN factor; 1 switches YaRN off
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_attention_factor: float = 1.0     # cos/sin factor beyond mscale / mscale_all_dim (HF attention_factor)
    max_position_embeddings: int = 4096
    mtp_depth: int = 0                     # num_nextn_predict_layers
    init_std: float = 0.006

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"        # 1f1b | dualpipe | dualpipev
    pipeline_layout: str | None = None     # stages split by '|', e.g. "Ett|tt|tt|ttLm"; default: even split
    pipeline_trace_step: int = 0           # > 0: time that step's pipeline actions into <run_dir>/pipeline_trace.json
    zero_stage: int = 1
    deepspeed_config: str | None = None    # extra DeepSpeed JSON merged into the generated one


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16                 # sequences per optimizer step
    micro_batch: int = 4                   # sequences per forward/backward
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_schedule: str = "cosine"            # constant | cosine
    warmup_steps: int = 20
    decay_start: int | None = None         # cosine start; default: end of warmup
    decay_steps: int | None = None         # cosine length; default: to the last step
    lr_after: list = field(default_factory=list)  # [[step, lr], ...] constant stages after the decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    device: str = "auto"                   # auto | cpu | cuda
    dtype: str = "auto"                    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    precision: str = "auto"                # with bf16: main_grads (fp32 weights, their bf16 copies made once per
                                           # optimizer step, fp32 weight gradients written by the GEMMs: Megatron's
                                           # layout) | autocast (torch.autocast casts the weights at every use) |
                                           # auto (main_grads, autocast where the layers are compiled: the
                                           # combination measured fastest so far, benchmarks/RESULTS.md)
    compile: str = "auto"                  # auto (layers on a single GPU without FP8) | layers (torch.compile each
                                           # decoder layer, as torchtitan's regional compile) | none
    head_loss: str = "plain"               # plain (all tokens' logits, then the cross-entropy) | fused (output head
                                           # + cross-entropy a chunk of tokens at a time: 2.9 GiB less on the bench
                                           # shape at the same step time, benchmarks/RESULTS.md)
    recompute: str = "none"                # none | selective (keep GEMM and attention outputs, recompute norms,
                                           # rope, SwiGLU, casts) | full (keep each decoder layer's input only)
    bias_update_speed: float | list = 0.001  # gamma, or [[step, gamma], ...]
    bias_recenter: bool = False
    seq_aux_alpha: float = 0.0001
    mtp_loss_weight: float | list = 0.3    # lambda, or [[step, lambda], ...]
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 4
    max_nonfinite_steps: int = 3           # consecutive skipped steps before stopping
    peak_tflops: float | None = None       # for MFU; default: the device's known bf16 peak
    run_dir: str | None = None             # default: runs/<config name>
    archive_previous_run: bool = False     # a fresh start into a run directory holding a run moves that run to
                                           # <run_dir>/previous/<time>/ (default: refuse, naming the choices)


@dataclass
class DataConfig:
    source: str = "synthetic"              # synthetic | indexed
    train_path: str | None = None          # indexed: prefix of .bin/.idx
    valid_path: str | None = None          # indexed: prefix of held-out .bin/.idx
    tokenizer: str | None = None           # indexed: HF tokenizer.json (or its directory) or sentencepiece .model
    cache_dir: str = ".megads_cache"       # synthetic: where corpus, tokenizer, datasets are built
    synthetic_docs: int = 20000
    synthetic_valid_docs: int = 500
    seed: int = 1234


@dataclass
class FP8Config:
    enabled: bool = False
    backend: str = "emulated"              # emulated (any device) | torch (Hopper: torch._scaled_mm blockwise)
    power_of_two_scales: bool = False      # round each scale up to a power of two
    exclude: list = field(default_factory=list)  # module name patterns (fnmatch) kept in high precision
    cache_fp8_activations: bool = False    # save Linear / expert inputs for Wgrad already in FP8
    cache_weights: bool = True             # quantise each weight once per optimizer step, reuse it per micro-batch
    dispatch: bool = False                 # send the expert-dispatch all-to-all as E4M3 + 1x128 scales (needs parallel.ep > 1)


@dataclass
class CheckpointConfig:
    interval: int = 0                      # save every N steps (0: only at the end)
    dir: str | None = None                 # default: <run_dir>/checkpoints
    keep_last: int = 2
    resume: str = "auto"                   # auto (latest in dir) | none | a checkpoint path
    save_at_end: bool = True
    verify: bool = True                    # check every file's sha256 (recorded at save) before loading
    weights_only: bool = False             # load only the model weights of checkpoint.resume: step 0, fresh optimizer


@dataclass
class SFTConfig:
    """Supervised fine-tuning on the synthetic problems: loss on the response tokens only."""

    init: str | None = None                # checkpoint to start from (null: the config's fresh initialisation)
    tiers: list = field(default_factory=lambda: [0, 1, 2, 3])   # synthetic difficulty tiers trained on
    max_len: int = 64                      # prompt + response + eos tokens; longer examples are skipped
    eval_interval: int = 50                # greedy held-out accuracy every N steps (0: only at start and end)
    eval_problems: int = 128
    stop_at_accuracy: float | None = None  # end early once held-out greedy accuracy reaches this (a cold start for GRPO)


@dataclass
class GRPOConfig:
    """GRPO post-training (DeepSeekMath; DAPO / Dr. GRPO / GSPO options). train.steps counts rollout batches."""

    init: str | None = None                # checkpoint to start from (null: the config's fresh initialisation)
    tiers: list = field(default_factory=lambda: [0, 1])          # synthetic tiers the prompts come from
    prompts_per_step: int = 16             # prompts per rollout batch (over all DP ranks)
    group_size: int = 8                    # G responses per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    updates_per_batch: int = 1             # mu: policy updates on each rollout batch
    micro_batch: int = 64                  # sequences per forward/backward
    clip_low: float = 0.2
    clip_high: float = 0.28                # DAPO clip-higher
    kl_beta: float = 0.0                   # 0 skips the reference model
    kl_estimator: str = "k3"               # k1 | k2 | k3
    advantage: str = "grpo"                # grpo | dr_grpo | loo
    aggregation: str = "token-mean"        # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    sequence_ratio: bool = False           # GSPO sequence-level ratio
    dynamic_sampling: bool = True          # drop groups whose rewards are all equal from the loss
    rewards: list = field(default_factory=lambda: ["accuracy", "format"])   # built-in names or module:function
    reward_weights: list | None = None     # one per reward (default 1.0 each)
    overlong_cache: int = 0                # > 0: DAPO overlong penalty over the last N of max_new_tokens
    routing_replay: bool = True            # the update forward reuses the experts chosen at rollout
    old_logprobs: str = "rollout"          # rollout (sampling log-probs) | recompute (a training forward first)
    shuffle_rewards: bool = False          # negative control: permute rewards across the batch's responses
    eval_interval: int = 10                # greedy held-out accuracy every N steps (0: only at start and end)
    eval_problems: int = 128


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    name: str = "megads"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> "Config":
        _validate_model(self.model)
        _validate_train(self.train, self.model)
        _validate_data(self.data)
        _validate_parallel(self.parallel, self.model, self.train, world_size)
        _validate_fp8(self.fp8, self.train, self.parallel)
        _validate_fusion(self.train, self.parallel, self.fp8)
        _validate_checkpoint(self.checkpoint)
        _validate_sft(self.sft)
        _validate_grpo(self.grpo)
        return self

    def check_machine(self) -> "Config":
        """Settings this machine cannot run (checked by the entry points before any work; `validate`
        stays machine-independent, so a config for GPUs validates anywhere)."""
        import torch
        gpu = torch.cuda.is_available()
        _require(self.train.device != "cuda" or gpu, "train.device=cuda but PyTorch sees no GPU here; "
                                                     "use train.device=auto or cpu")
        _require(not (self.fp8.enabled and self.fp8.backend == "torch" and not gpu),
                 f"fp8.backend=torch runs on a Hopper GPU, but PyTorch sees no GPU here (train.device="
                 f"{self.train.device} runs on the CPU); use fp8.backend=emulated on CPU")
        return self

    def validate_generation_layout(self, world_size: int, problems: int) -> "Config":
        """SFT and GRPO generate on the training ranks; check the layout allows it (pretraining
        layouts that it does not allow stay valid for pretraining)."""
        p = self.parallel
        _require(not (p.tp > 1 and p.ep > 1) and not p.sequence_parallel,
                 "generation feeds one token per sequence per step, which cannot be split over TP ranks: use "
                 "parallel.tp=1 with expert parallelism, parallel.ep=1 with tensor parallelism, and "
                 "parallel.sequence_parallel=false")
        _require(p.pp == 1, "SFT and GRPO run without pipeline parallelism; set parallel.pp=1")
        _require(not self.fp8.enabled, "SFT and GRPO train in bf16 / fp32 (FP8 is a pretraining recipe); "
                                       "set fp8.enabled=false")
        _require(self.train.compile != "layers", "SFT and GRPO run their layers eagerly (generation feeds them "
                                                 "a new shape every token); set train.compile=auto or none")
        dp = world_size // p.tp
        _require(problems % dp == 0, f"{problems} problems per batch (grpo.prompts_per_step / eval_problems) are not "
                                     f"divisible by the data-parallel size {dp}")
        return self

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or os.path.join("runs", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


# ----------------------------------------------------------------------------- loading

def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read YAML (or start from defaults when `path` is None) and apply `a.b=value` overrides."""
    raw: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist; pass the path of a YAML file such as configs/tiny.yaml")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, train:, ...)")
        raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=50)")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return _build(Config, raw, "")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:                                                # YAML 1.1 reads "2e-4" as a string
                number = float(value)
            except ValueError:
                continue
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return number
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is list and isinstance(value, list):
            return value
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


# ----------------------------------------------------------------------------- validation

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_model(m: ModelConfig) -> None:
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(0 <= m.first_k_dense <= m.num_layers,
             f"model.first_k_dense={m.first_k_dense} must be between 0 and model.num_layers={m.num_layers}")
    _require(m.q_lora_rank >= 0, f"model.q_lora_rank must be >= 0 (0 disables query compression), got {m.q_lora_rank}")
    _require(m.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    _require(m.mtp_depth >= 0, f"model.mtp_depth must be >= 0, got {m.mtp_depth}")
    _require(m.rope_factor >= 1.0, f"model.rope_factor={m.rope_factor} must be >= 1 (1 disables YaRN)")
    _require(m.rope_attention_factor > 0, f"model.rope_attention_factor must be positive, got {m.rope_attention_factor}")
    if m.n_moe_layers > 0 or m.mtp_depth > 0:
        _require(m.n_routed_experts > 0, f"model.n_routed_experts must be positive when MoE layers exist, got {m.n_routed_experts}")
        _require(m.moe_intermediate_size > 0, f"model.moe_intermediate_size must be positive, got {m.moe_intermediate_size}")
        _require(m.n_group > 0 and m.n_routed_experts % m.n_group == 0,
                 f"model.n_routed_experts={m.n_routed_experts} is not divisible by model.n_group={m.n_group}; "
                 f"choose n_group among the divisors of n_routed_experts")
        _require(1 <= m.topk_group <= m.n_group,
                 f"model.topk_group={m.topk_group} must be between 1 and model.n_group={m.n_group}")
        per_group = m.n_routed_experts // m.n_group
        _require(1 <= m.num_experts_per_tok <= m.topk_group * per_group,
                 f"model.num_experts_per_tok={m.num_experts_per_tok} must be between 1 and topk_group * experts per group "
                 f"= {m.topk_group * per_group}")
        _require(m.n_group == 1 or per_group >= 2,
                 f"model.n_group={m.n_group} leaves {per_group} expert per group; groups are scored by their top-2 "
                 f"experts, so use n_group <= {m.n_routed_experts // 2}")
        _require(m.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {m.n_shared_experts}")


def _validate_schedule(value: float | list, key: str) -> None:
    if isinstance(value, list):
        ok = all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], (int, float))
                 and not isinstance(p[1], bool) and math.isfinite(p[1]) for p in value) and value and value[0][0] == 0
        _require(bool(ok), f"train.{key} must be a number or a list of [step, value] pairs starting at step 0, got {value!r}")
        steps = [p[0] for p in value]
        _require(steps == sorted(set(steps)), f"train.{key}: steps must increase, got {steps}")


def _validate_fusion(t: TrainConfig, p: ParallelConfig, f: FP8Config) -> None:
    """The fused head needs the whole vocabulary on the rank. Recompute wraps whole decoder layers,
    which a pipeline does not run. Compiled layers are measured on one GPU in bf16; with model
    parallelism or FP8 the layers hold collectives and cached quantisations that compilation has
    not been checked against."""
    _require(t.head_loss != "fused" or p.tp == 1,
             f"train.head_loss=fused takes the whole vocabulary on one rank, but parallel.tp={p.tp} splits it (the "
             f"vocabulary-parallel cross-entropy never gathers the logits either); use train.head_loss=plain")
    _require(t.recompute == "none" or p.pp == 1,
             f"train.recompute={t.recompute} recomputes decoder layers run whole, but with parallel.pp={p.pp} the "
             f"pipeline runs them in pieces (attention, dispatch, experts, combine); use train.recompute=none")
    if t.compile != "layers":
        return
    others = [f"parallel.{k}={getattr(p, k)}" for k in ("tp", "ep", "pp") if getattr(p, k) > 1] \
        + (["fp8.enabled=true"] if f.enabled else [])
    _require(not others, f"train.compile=layers compiles the layers of runs without tensor, expert or pipeline "
                         f"parallelism and without FP8, but this config has {', '.join(others)}; "
                         f"use train.compile=auto (which compiles only where it applies) or none")


def _validate_train(t: TrainConfig, m: ModelConfig) -> None:
    for key in ("steps", "global_batch", "micro_batch", "seq_len", "log_interval"):
        _require(getattr(t, key) > 0, f"train.{key} must be positive, got {getattr(t, key)}")
    _require(t.global_batch % t.micro_batch == 0,
             f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}")
    _require(t.seq_len <= m.max_position_embeddings,
             f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    _require(t.lr_schedule in ("constant", "cosine"), f"train.lr_schedule must be constant or cosine, got {t.lr_schedule!r}")
    _require(t.lr > 0, f"train.lr must be a positive learning rate, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.decay_start is None or t.decay_start >= 0, f"train.decay_start must be >= 0 or null, got {t.decay_start}")
    _require(t.decay_steps is None or t.decay_steps > 0,
             f"train.decay_steps must be positive (the cosine's length in steps) or null (to the last step), "
             f"got {t.decay_steps}")
    for pair in t.lr_after:
        _require(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] >= 0
                 and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)
                 and math.isfinite(pair[1]) and pair[1] >= 0,
                 f"train.lr_after entries must be [step, lr] with a step >= 0 and a finite lr >= 0, got {pair!r}")
    _require(0 <= t.seed < 2 ** 32, f"train.seed must be between 0 and 2**32 - 1, got {t.seed}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(t, key) < 1, f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    _require(t.eps > 0, f"train.eps must be positive (AdamW divides by sqrt(v) + eps), got {t.eps}")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    _require(t.dtype in ("auto", "bf16", "fp32"), f"train.dtype must be auto, bf16 or fp32, got {t.dtype!r}")
    _require(t.precision in ("auto", "main_grads", "autocast"),
             f"train.precision must be auto, main_grads or autocast, got {t.precision!r}")
    _require(t.compile in ("auto", "layers", "none"), f"train.compile must be auto, layers or none, got {t.compile!r}")
    _require(t.recompute in ("none", "selective", "full"),
             f"train.recompute must be none, selective or full, got {t.recompute!r}")
    _require(t.head_loss in ("plain", "fused"), f"train.head_loss must be plain or fused, got {t.head_loss!r}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _require(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    _require(t.eval_interval >= 0 and t.eval_batches >= 1, "train.eval_interval must be >= 0 and train.eval_batches >= 1")
    _require(t.peak_tflops is None or t.peak_tflops > 0, f"train.peak_tflops must be positive or null, got {t.peak_tflops}")
    _require(t.run_dir is None or not os.path.exists(t.run_dir) or os.path.isdir(t.run_dir),
             f"train.run_dir={t.run_dir!r} is an existing file, not a directory; choose a directory path")
    _validate_schedule(t.bias_update_speed, "bias_update_speed")
    _validate_schedule(t.mtp_loss_weight, "mtp_loss_weight")


def _validate_data(d: DataConfig) -> None:
    _require(d.source in ("synthetic", "indexed"), f"data.source must be synthetic or indexed, got {d.source!r}")
    if d.source == "indexed":
        for key in ("train_path", "valid_path"):
            prefix = getattr(d, key)
            _require(prefix is not None, f"data.{key} must be set when data.source=indexed (the prefix of a .bin/.idx pair "
                                         f"made by tools/preprocess_data.py)")
            for ext in (".bin", ".idx"):
                _require(os.path.exists(prefix + ext), f"data.{key}: {prefix + ext} does not exist; "
                                                       f"build it with tools/preprocess_data.py")
        _require(d.tokenizer is not None and os.path.exists(d.tokenizer),
                 f"data.tokenizer={d.tokenizer!r} does not exist; set it to a HuggingFace tokenizer.json (or its "
                 f"directory) or a sentencepiece .model (tools/train_tokenizer.py trains one)")
    else:
        _require(d.synthetic_docs > 0 and d.synthetic_valid_docs > 0,
                 "data.synthetic_docs and data.synthetic_valid_docs must be positive")


def _validate_parallel(p: ParallelConfig, m: ModelConfig, t: TrainConfig, world_size: int | None) -> None:
    for key in ("tp", "pp", "ep"):
        _require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _require(p.pipeline_schedule in ("1f1b", "dualpipe", "dualpipev"),
             f"parallel.pipeline_schedule must be 1f1b, dualpipe or dualpipev, got {p.pipeline_schedule!r}")
    _require(p.zero_stage in (0, 1, 2), f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}")
    _require(m.num_heads % p.tp == 0, f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}")
    _require(m.vocab_size % p.tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp} "
                                       f"(the vocabulary is split over TP ranks); pad the vocabulary")
    _require(not p.sequence_parallel or p.tp > 1,
             "parallel.sequence_parallel=true needs parallel.tp > 1 (it shards activations over TP ranks)")
    _require(not p.sequence_parallel or t.seq_len % p.tp == 0,
             f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}, needed by parallel.sequence_parallel")
    if m.n_moe_layers > 0:
        _require(m.n_routed_experts % p.ep == 0,
                 f"model.n_routed_experts={m.n_routed_experts} is not divisible by parallel.ep={p.ep}")
        _require(p.ep % m.n_group == 0 or m.n_group % p.ep == 0,
                 f"model.n_group={m.n_group} does not fit parallel.ep={p.ep}: node-limited routing lays each expert "
                 f"group onto a block of EP ranks, so n_group must divide ep or be a multiple of it")
    if p.deepspeed_config is not None:
        _validate_deepspeed_json(p.deepspeed_config)
    if world_size is None:
        return
    _require(world_size % (p.tp * p.pp) == 0,
             f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp} = {p.tp * p.pp}: "
             f"launch a multiple of {p.tp * p.pp} ranks (python launch/run.py --nproc-per-node {p.tp * p.pp} ...) or "
             f"lower parallel.tp / parallel.pp (one process runs with parallel.tp=1 parallel.pp=1)")
    dp = world_size // (p.tp * p.pp)
    _require(p.ep == 1 or p.tp == 1 or p.sequence_parallel or t.seq_len % p.tp == 0,
             f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}: with parallel.ep > 1 each TP rank "
             f"routes its own slice of the sequence")
    _require((dp * p.tp) % p.ep == 0,
             f"parallel.ep={p.ep} does not divide dp * tp = {dp} * {p.tp} = {dp * p.tp} (the ranks of one pipeline stage)")
    _require(t.global_batch % (dp * t.micro_batch) == 0,
             f"train.global_batch={t.global_batch} is not divisible by dp * train.micro_batch = {dp} * {t.micro_batch}")
    _require(p.pipeline_trace_step >= 0 and (p.pipeline_trace_step == 0 or p.pp > 1),
             f"parallel.pipeline_trace_step={p.pipeline_trace_step} traces a pipeline step, so it needs parallel.pp > 1 "
             f"(got pp={p.pp}) and a step number >= 1; set it to 0 to switch tracing off")
    if p.pp > 1:
        _validate_pipeline(p, m, t.global_batch // (dp * t.micro_batch), dp)


def _validate_deepspeed_json(path: str) -> None:
    _require(os.path.isfile(path), f"parallel.deepspeed_config: {path} does not exist")
    try:
        with open(path) as f:
            extra = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON ({err}); fix the file or drop the "
                          f"setting") from None
    _require(isinstance(extra, dict), f"parallel.deepspeed_config: {path} must hold a JSON object of DeepSpeed settings")


def _validate_pipeline(p: ParallelConfig, m: ModelConfig, micro_batches: int, dp: int) -> None:
    """Pipeline rules: DualPipe pairs stage r with pp-1-r; the dual schedules fill from both ends."""
    _require(dp == 1 or p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp} is not supported: ZeRO-2 reduces gradients "
             f"in backward hooks that the pipeline's split backward bypasses; use parallel.zero_stage=1 (or 0)")
    _require(p.pipeline_schedule != "dualpipe" or p.pp % 2 == 0,
             f"parallel.pipeline_schedule=dualpipe needs an even parallel.pp (rank r holds stages r and pp-1-r), "
             f"got pp={p.pp}; use an even pp or pipeline_schedule=dualpipev")
    if p.pipeline_schedule in ("dualpipe", "dualpipev"):
        _require(micro_batches >= 2 * p.pp and (p.pipeline_schedule == "dualpipev" or micro_batches % 2 == 0),
                 f"parallel.pipeline_schedule={p.pipeline_schedule} needs micro-batches per step = train.global_batch / "
                 f"(dp * train.micro_batch) = {micro_batches} to be {'even and ' if p.pipeline_schedule == 'dualpipe' else ''}"
                 f">= 2 * parallel.pp = {2 * p.pp}; raise train.global_batch or lower train.micro_batch")
    stages = p.pp * (2 if p.pipeline_schedule == "dualpipev" else 1)
    if p.pipeline_layout is None:
        _require(m.num_layers >= stages, f"model.num_layers={m.num_layers} is fewer than the {stages} pipeline stages "
                                         f"of parallel.pp={p.pp} with {p.pipeline_schedule}; lower parallel.pp")
    else:
        parse_layout(p.pipeline_layout, m.num_layers, stages, m.mtp_depth > 0)


def parse_layout(layout: str, num_layers: int, n_stages: int, mtp: bool) -> list[int]:
    """Layers per stage from a layout string: stages separated by '|', 't' one decoder layer,
    'E' the embedding (first stage only), 'L' the head and loss (last stage only), 'm' the MTP
    depths (last stage, after 'L'). Example for 4 stages: "Ett|tt|tt|ttLm". It lives here, not in
    parallel/pipeline/placement.py (which splits the stages by it), so that validation needs nothing
    from parallel/."""
    stages = layout.replace(" ", "").split("|")
    rule = "; write stages as 'Ett|tt|...|ttL' with E first, L last and m after L when model.mtp_depth > 0"
    if len(stages) != n_stages:
        raise ConfigError(f"parallel.pipeline_layout={layout!r} has {len(stages)} stages, the schedule has {n_stages}{rule}")
    if set(layout) - set("EtLm| "):
        raise ConfigError(f"parallel.pipeline_layout={layout!r} uses characters other than E, t, L, m and '|'{rule}")
    if not mtp and "m" in layout:
        raise ConfigError(f"parallel.pipeline_layout={layout!r} places MTP (m) but model.mtp_depth=0")
    if not stages[0].startswith("E") or "E" in "".join(stages)[1:]:
        raise ConfigError(f"parallel.pipeline_layout={layout!r}: the embedding E must open the first stage{rule}")
    last = stages[-1]
    if not (last.endswith("Lm") if mtp else last.endswith("L")) or "L" in "".join(stages[:-1]) + last[:last.index("L")]:
        raise ConfigError(f"parallel.pipeline_layout={layout!r}: the head L{' and MTP m' if mtp else ''} must close the "
                          f"last stage{rule}")
    counts = [s.count("t") for s in stages]
    if sum(counts) != num_layers:
        raise ConfigError(f"parallel.pipeline_layout={layout!r} places {sum(counts)} layers, model.num_layers={num_layers}")
    return counts


def _validate_fp8(f: FP8Config, t: TrainConfig, p: ParallelConfig) -> None:
    _require(f.backend in ("emulated", "torch"), f"fp8.backend must be emulated or torch, got {f.backend!r}")
    _require(isinstance(f.exclude, list) and all(isinstance(p, str) for p in f.exclude),
             f"fp8.exclude must be a list of module name patterns, e.g. ['lm_head', 'layers.0.*'], got {f.exclude!r}")
    _require(not (f.enabled and f.backend == "torch" and t.device == "cpu"),
             "fp8.backend=torch runs on a Hopper GPU, but train.device=cpu; use fp8.backend=emulated on CPU")
    _require(not f.dispatch or (f.enabled and p.ep > 1),
             f"fp8.dispatch=true sends the expert-parallel dispatch in FP8, so it needs fp8.enabled=true and "
             f"parallel.ep > 1 (got fp8.enabled={str(f.enabled).lower()}, parallel.ep={p.ep}); set both or drop fp8.dispatch")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(c.interval >= 0, f"checkpoint.interval must be >= 0, got {c.interval}")
    _require(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {c.keep_last}")
    _require(c.dir is None or not os.path.exists(c.dir) or os.path.isdir(c.dir),
             f"checkpoint.dir={c.dir!r} is an existing file, not a directory; choose a directory path")
    _require(c.resume in ("auto", "none") or os.path.exists(c.resume),
             f"checkpoint.resume must be auto, none or an existing checkpoint path, got {c.resume!r}")
    _require(not c.weights_only or c.resume not in ("auto", "none"),
             "checkpoint.weights_only=true loads the weights of the checkpoint named by checkpoint.resume; "
             "set checkpoint.resume=PATH")


def _validate_problems(section: str, tiers: list, eval_problems: int, init: str | None) -> None:
    _require(bool(tiers) and all(isinstance(t, int) and 0 <= t <= 3 for t in tiers),
             f"{section}.tiers must be a non-empty list of synthetic tiers 0..3, got {tiers!r}")
    _require(eval_problems > 0, f"{section}.eval_problems must be positive, got {eval_problems}")
    _require(init is None or os.path.exists(init),
             f"{section}.init={init!r} does not exist; give a checkpoint directory (e.g. runs/tiny/checkpoints/step_00000200)")


def _validate_sft(s: SFTConfig) -> None:
    _validate_problems("sft", s.tiers, s.eval_problems, s.init)
    _require(s.max_len >= 8, f"sft.max_len must be >= 8 tokens, got {s.max_len}")
    _require(s.eval_interval >= 0, f"sft.eval_interval must be >= 0, got {s.eval_interval}")
    _require(s.stop_at_accuracy is None or (0 < s.stop_at_accuracy <= 1 and s.eval_interval > 0),
             f"sft.stop_at_accuracy={s.stop_at_accuracy} must be in (0, 1] and needs sft.eval_interval > 0")


def _validate_grpo(g: GRPOConfig) -> None:
    _validate_problems("grpo", g.tiers, g.eval_problems, g.init)
    for key in ("prompts_per_step", "max_new_tokens", "updates_per_batch", "micro_batch"):
        _require(getattr(g, key) > 0, f"grpo.{key} must be positive, got {getattr(g, key)}")
    _require(g.group_size >= 2, f"grpo.group_size must be >= 2 (rewards are normalised within a group), got {g.group_size}")
    _require(g.temperature > 0, f"grpo.temperature must be > 0 (greedy decoding is for evaluation), got {g.temperature}")
    _require(0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}")
    _require(0 <= g.clip_low < 1 and g.clip_high >= 0,
             f"grpo.clip_low must be in [0, 1) and grpo.clip_high >= 0, got {g.clip_low} and {g.clip_high}")
    _require(g.kl_beta >= 0, f"grpo.kl_beta must be >= 0 (0 skips the reference model), got {g.kl_beta}")
    for key, allowed in (("kl_estimator", ("k1", "k2", "k3")), ("advantage", ("grpo", "dr_grpo", "loo")),
                         ("aggregation", ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")),
                         ("old_logprobs", ("rollout", "recompute"))):
        _require(getattr(g, key) in allowed, f"grpo.{key} must be one of {', '.join(allowed)}, got {getattr(g, key)!r}")
    _require(bool(g.rewards) and all(isinstance(r, str) for r in g.rewards),
             f"grpo.rewards must be a non-empty list of reward names or module:function paths, got {g.rewards!r}")
    _require(g.reward_weights is None or len(g.reward_weights) == len(g.rewards),
             f"grpo.reward_weights needs one weight per reward ({len(g.rewards)}), got {g.reward_weights!r}")
    _require(0 <= g.overlong_cache <= g.max_new_tokens,
             f"grpo.overlong_cache={g.overlong_cache} must be between 0 and grpo.max_new_tokens={g.max_new_tokens}")
    _require(g.eval_interval >= 0, f"grpo.eval_interval must be >= 0, got {g.eval_interval}")


def schedule_value(value: float | list, step: int) -> float:
    """A constant, or the value of the last [start_step, value] pair with start_step <= step."""
    if not isinstance(value, list):
        return float(value)
    current = float(value[0][1])
    for start, v in value:
        if step >= start:
            current = float(v)
    return current


def lr_at(t: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine, then `lr_after`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    lr = t.lr
    if t.lr_schedule == "cosine":
        start = t.decay_start if t.decay_start is not None else t.warmup_steps
        length = t.decay_steps if t.decay_steps is not None else max(t.steps - start, 1)
        progress = min(max(step - start, 0) / length, 1.0)
        lr = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    for start, value in t.lr_after:
        if step >= start:
            lr = float(value)
    return lr
