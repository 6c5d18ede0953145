"""Offline conversions, streaming tensor by tensor: megads <-> HuggingFace DeepseekV3, and
re-cutting a megads checkpoint's pieces for a target layout.

Each function takes `progress(iterable, total, desc)` (tqdm in tools/convert_checkpoint.py)
and returns a summary dict. Outputs are written into `<out>.tmp` and renamed when complete.

Tokenizer files travel with the weights: `from_hf` stores those of the HF directory under the
checkpoint's `tokenizer/`, listed in its index with their sha256 like every other file (loading
reads and verifies only the files holding pieces and trainer.pt, so they change nothing there);
`reshard` keeps them; `to_hf` writes them (or those of a tokenizer it is given) into the HF
directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import defaultdict
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megads.checkpoint.format import TOKENIZER_DIR, TRAINER_STATE, CheckpointError, CheckpointReader, Piece, \
    PieceWriter, merge_indexes, write_bytes, write_index
from megads.checkpoint.hf import (HFTensor, config_from_metadata, dequantise_weight, hf_config, hf_tensors,
                                  megads_name, model_config, quantise_weight, quantised, scale_name, shared_copy_source)
from megads.checkpoint.layout import MODEL, expected_tensors
from megads.checkpoint.sharded import check_model_tensors, resolve
from megads.config import Config, ModelConfig
from megads.data.tokenizer import HF_FILE, SP_FILE, load_tokenizer
from megads.fp8.quant import E4M3
from megads.parallel.mesh import Mesh
from megads.parallel.plan import plan_layout

log = logging.getLogger("megads")
Progress = Callable[[Iterable, int, str], Iterable]
HF_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = (HF_FILE, *TOKENIZER_CONFIGS, SP_FILE)      # the tokenizer files of a HuggingFace directory


def no_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return items


def _begin(out: str) -> str:
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new output directory")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _open_verified(checkpoint: str, trainer_state: bool) -> CheckpointReader:
    """The checkpoint, with every file the conversion reads checked against its sha256 first: a
    conversion must not carry damage into new files with fresh checksums."""
    reader = CheckpointReader(resolve(checkpoint))
    if not reader.has_checksums:
        log.warning(f"checkpoint {reader.path} is of format version 1, which carries no checksums: its files are "
                    f"checked for size only")
    reader.verify(reader.data_files() + ([TRAINER_STATE] if trainer_state and reader.has_trainer_state else []))
    return reader


# ----------------------------------------------------------------------------- tokenizer files

def _present(folder: str, names: tuple[str, ...]) -> dict[str, str]:
    return {name: os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))}


def tokenizer_files(path: str) -> dict[str, str]:
    """The tokenizer files at `path`, by the name a HuggingFace directory gives each -> where they are:
    those of TOKENIZER_FILES in a directory, or a tokenizer.json / .model file with the
    tokenizer_config.json and special_tokens_map.json beside it."""
    if os.path.isdir(path):
        return _present(path, TOKENIZER_FILES)
    return {HF_FILE if path.endswith(".json") else SP_FILE: path, **_present(os.path.dirname(path), TOKENIZER_CONFIGS)}


def _named_tokenizer(path: str, cfg: ModelConfig) -> dict[str, str]:
    """The files of tokenizer `path`, refused when it does not load or has more tokens than the model."""
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the checkpoint's model has "
                         f"vocab_size={cfg.vocab_size}; give the tokenizer the model was trained with")
    return tokenizer_files(path)


def _carried_tokenizer(reader: CheckpointReader) -> dict[str, str]:
    """The tokenizer files the checkpoint carries, checked against their sha256 in its index."""
    names = sorted(name for name in reader.files if name.startswith(TOKENIZER_DIR + "/"))
    reader.verify(names)
    return {name.removeprefix(TOKENIZER_DIR + "/"): os.path.join(reader.path, name) for name in names}


def _store_tokenizer(sources: dict[str, str], directory: str) -> dict[str, dict]:
    """Copy tokenizer files into `directory`/tokenizer/; their index entries {"bytes", "sha256"}."""
    entries = {}
    for name, source in sources.items():
        with open(source, "rb") as f:
            data = f.read()
        os.makedirs(os.path.join(directory, TOKENIZER_DIR), exist_ok=True)
        entries[f"{TOKENIZER_DIR}/{name}"] = write_bytes(os.path.join(directory, TOKENIZER_DIR, name), data)
    return entries


# ----------------------------------------------------------------------------- megads -> HF

def to_hf(checkpoint: str, out: str, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
          max_shard_bytes: int = 5 << 30, progress: Progress = no_progress, tokenizer: str | None = None) -> dict:
    """Write safetensors shards, their index and config.json for DeepseekV3ForCausalLM, and the tokenizer
    files: those of `tokenizer` (a tokenizer file or a directory, see `tokenizer_files`) when given,
    else those the checkpoint carries."""
    reader = _open_verified(checkpoint, trainer_state=False)
    if "model_config" not in reader.metadata:
        raise CheckpointError(f"checkpoint {reader.path} records no model_config; it was not written by megads' trainer "
                              f"or converter")
    cfg = config_from_metadata(reader.metadata)
    check_model_tensors(reader, cfg)
    tokenizer_sources = _named_tokenizer(tokenizer, cfg) if tokenizer else _carried_tokenizer(reader)
    if not tokenizer_sources:
        log.warning(f"checkpoint {reader.path} carries no tokenizer, so {out} will hold none; name one with "
                    f"--tokenizer (a tokenizer.json, a .model or a directory)")
    plan: list[tuple[HFTensor, tuple[int, ...], int]] = []
    for name, shape in expected_tensors(cfg).items():
        for t in hf_tensors(name, shape, cfg):
            out_shape = shape[1:] if t.expert is not None else shape
            numel = torch.Size(out_shape).numel()
            nbytes = numel * (1 if fp8 and quantised(t.name) else 4 if name.endswith("e_score_correction_bias")
                              else torch.empty(0, dtype=dtype).element_size())
            plan.append((t, out_shape, nbytes))
    shards: list[list[tuple[HFTensor, tuple[int, ...], int]]] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + entry[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[2]
    tmp = _begin(out)
    weight_map, total = {}, 0
    bar = iter(progress(range(len(plan)), len(plan), "to-hf"))
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for t, shape, _ in shard:
            offset = (t.expert,) + (0,) * len(shape) if t.expert is not None else None
            region = (1,) + shape if t.expert is not None else None
            value = reader.read(MODEL + t.source, offset, region).reshape(shape)
            if t.source.endswith("e_score_correction_bias"):
                tensors[t.name] = value.float()
            elif fp8 and quantised(t.name):
                tensors[t.name], tensors[scale_name(t.name)] = quantise_weight(value)
            else:
                tensors[t.name] = value.to(dtype)
            next(bar, None)
        save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        for name, value in tensors.items():
            weight_map[name] = file
            total += value.numel() * value.element_size()
    with open(os.path.join(tmp, HF_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype, fp8), f, indent=2, sort_keys=True)
    for name, source in tokenizer_sources.items():
        shutil.copyfile(source, os.path.join(tmp, name))
    os.replace(tmp, out)
    return {"output": out, "tensors": len(weight_map), "files": len(shards), "bytes": total,
            "fp8_tensors": sum(1 for n in weight_map if n.endswith("_scale_inv")), "mtp_layers": cfg.mtp_depth,
            "tokenizer_files": len(tokenizer_sources)}


# ----------------------------------------------------------------------------- HF -> megads

class HFReader:
    """Tensors of a HuggingFace safetensors checkpoint (sharded with an index, or one file)."""

    def __init__(self, path: str):
        self.path = path
        self._handles: dict = {}
        index = os.path.join(path, HF_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            names = self._open("model.safetensors", "the tensor names").keys()
            self.weight_map = {name: "model.safetensors" for name in names}
        else:
            raise FileNotFoundError(f"{path} holds neither {HF_INDEX} nor model.safetensors")
        for file in sorted(set(self.weight_map.values())):
            if not os.path.exists(os.path.join(path, file)):
                raise CheckpointError(f"{path} is missing {file}, which holds "
                                      f"{next(n for n, f in self.weight_map.items() if f == file)}")

    def _open(self, file: str, what: str):
        if file not in self._handles:
            path = os.path.join(self.path, file)
            try:
                self._handles[file] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {what} from {path} ({err}): the file is truncated or damaged, "
                                      f"copy or export it again") from err
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {name}")
        return self._open(self.weight_map[name], f"tensor {name}").get_tensor(name)

    def weight(self, name: str, dequant_dtype: torch.dtype) -> torch.Tensor:
        """The tensor, dequantised from FP8 blocks when it is stored so."""
        value = self.get(name)
        if value.dtype != E4M3:
            return value
        if scale_name(name) not in self.weight_map:
            raise CheckpointError(f"{name} is float8_e4m3fn but {scale_name(name)} is missing")
        return dequantise_weight(value, self.get(scale_name(name)), name).to(dequant_dtype)


def from_hf(hf_dir: str, out: str, dequant_dtype: torch.dtype = torch.bfloat16, max_file_bytes: int = 5 << 30,
            progress: Progress = no_progress) -> dict:
    """A megads checkpoint (weights only, step 0) from a HuggingFace DeepseekV3 directory, carrying its
    tokenizer files under tokenizer/."""
    hf = HFReader(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = model_config(json.load(f), hf.weight_map)
    sources: dict[str, list[tuple[int | None, str]]] = defaultdict(list)
    copies = []
    for name in hf.weight_map:
        if name.endswith("_scale_inv"):
            continue
        target = megads_name(name, cfg)
        if target is None:
            copies.append(name)
        else:
            sources[target[0]].append((target[1], name))
    expected = expected_tensors(cfg)
    for name in sources:
        if name not in expected:
            raise CheckpointError(f"{hf_dir}: tensor {sources[name][0][1]} has no place in a megads model of this "
                                  f"config.json (megads name {name})")
    tmp = _begin(out)
    writer = PieceWriter(tmp, "model", max_file_bytes)
    for name in progress(list(expected), len(expected), "from-hf"):
        shape = expected[name]
        found = sorted(sources.get(name, []), key=lambda s: -1 if s[0] is None else s[0])
        present = {expert for expert, _ in found}
        for t in hf_tensors(name, shape, cfg):
            if t.source == name and t.expert not in present and megads_name(t.name, cfg) is not None:
                raise CheckpointError(f"{hf_dir} has no tensor {t.name} (megads {name})")
        for expert, hf_name in found:
            value = hf.weight(hf_name, dequant_dtype)
            piece_shape = shape[1:] if expert is not None else shape
            if tuple(value.shape) != piece_shape:
                raise CheckpointError(f"tensor {hf_name} has shape {list(value.shape)}, config.json implies "
                                      f"{list(piece_shape)}")
            if expert is None:
                writer.add(Piece(MODEL + name, shape, (0,) * len(shape), value))
            else:
                writer.add(Piece(MODEL + name, shape, (expert,) + (0,) * len(piece_shape), value.unsqueeze(0)))
    for name in copies:
        if not torch.equal(hf.get(name), hf.get(shared_copy_source(name))):
            raise CheckpointError(f"{name} differs from {shared_copy_source(name)}; megads' MTP layers share the "
                                  f"main embedding and output head")
    writer.flush()
    tokenizer_entries = _store_tokenizer(tokenizer_files(hf_dir), tmp)
    write_index(tmp, {**writer.files, **tokenizer_entries}, writer.tensors,
                {"step": 0, "adam_step": 0, "source": os.path.abspath(hf_dir), "model_config": dataclasses.asdict(cfg)})
    os.replace(tmp, out)
    return {"output": out, "tensors": len(writer.tensors), "files": len(writer.files),
            "bytes": writer.total_bytes, "mtp_layers": cfg.mtp_depth, "shared_copies_checked": len(copies),
            "tokenizer_files": len(tokenizer_entries)}


# ----------------------------------------------------------------------------- re-cutting pieces

def split_dims(cfg: ModelConfig, tp: int, ep: int) -> dict[str, tuple[int | None, bool]]:
    """Global name -> (TP split dimension or None, expert-parallel?) under tp x ep."""
    plan = plan_layout(Config(model=cfg), Mesh(world_size=tp * ep, tp=tp, ep=ep, dp=ep))
    return {name: (p.tp_dim, p.expert) for name, p in plan.placements.items()}


def reshard(checkpoint: str, out: str, tp: int, ep: int, max_file_bytes: int = 5 << 30,
            progress: Progress = no_progress) -> dict:
    """Copy a checkpoint with its pieces cut as a tp x ep layout holds them, one file group per
    (TP rank, EP rank), so that the ranks of such a run each read their own files. Any
    checkpoint already loads under any layout; this only makes loading local."""
    reader = _open_verified(checkpoint, trainer_state=True)
    tokenizer_sources = _carried_tokenizer(reader)
    cfg = config_from_metadata(reader.metadata)
    splits = split_dims(cfg, tp, ep)
    writers: dict[tuple[int, int], PieceWriter] = {}
    tmp = _begin(out)
    names = sorted(reader.tensors)
    for name in progress(names, len(names), "reshard"):
        param = name.removeprefix(MODEL) if name.startswith(MODEL) else name.split(".", 2)[2]
        if param not in splits:
            raise CheckpointError(f"tensor {name} of {reader.path} is not part of a model of its recorded config")
        dim, expert = splits[param]
        shape = reader.shape(name)
        for t in range(tp if dim is not None else 1):
            for e in range(ep if expert else 1):
                offset, size = [0] * len(shape), list(shape)
                if dim is not None:
                    size[dim] //= tp
                    offset[dim] = t * size[dim]
                if expert:
                    size[0] //= ep
                    offset[0] = e * size[0]
                key = (t, e)
                if key not in writers:
                    writers[key] = PieceWriter(tmp, f"tp{t:03d}-ep{e:03d}", max_file_bytes)
                writers[key].add(Piece(name, shape, tuple(offset), reader.read(name, offset, size)))
    for writer in writers.values():
        writer.flush()
    files, tensors = merge_indexes([(w.files, w.tensors) for w in writers.values()])
    if reader.has_trainer_state:
        with open(os.path.join(reader.path, TRAINER_STATE), "rb") as f:
            files[TRAINER_STATE] = write_bytes(os.path.join(tmp, TRAINER_STATE), f.read())
    files.update(_store_tokenizer(tokenizer_sources, tmp))
    write_index(tmp, files, tensors, {**reader.metadata, "trainer_state": reader.has_trainer_state,
                                      "cut_for": {"tp": tp, "ep": ep}})
    os.replace(tmp, out)
    return {"output": out, "tensors": len(tensors), "files": len(files),
            "bytes": sum(entry["bytes"] for entry in files.values())}
