"""megads' on-disk checkpoint format: global tensors stored as pieces, with an index.

A checkpoint is a directory:

    index.json                 what the checkpoint holds (see below)
    trainer.pt                 trainer state that is not a tensor of the model (optional)
    <prefix>-<k>.safetensors   pieces: rectangular slices of global tensors

`index.json`:

    {"format": "megads-checkpoint", "version": 1,
     "metadata": {...},                                  # step, layout that wrote it, model config
     "files": {"rank00003-0.safetensors": 123456, ...},  # byte size of every piece file
     "tensors": {"model.layers.1.mlp.experts.gate_proj": {
         "shape": [8, 32, 64], "dtype": "float32",       # the global tensor
         "pieces": [{"file": ..., "key": ..., "offset": [4, 0, 0], "shape": [4, 32, 64]}, ...]}}}

The pieces of one tensor are disjoint and cover it exactly; how it was cut (by TP, EP or not
at all) is a property of the run that wrote it and nothing else depends on it. A reader
asks for any rectangular region of a global tensor and gets it assembled from the pieces
that overlap it, reading only those bytes (safetensors slices are memory-mapped).
Every inconsistency (missing file, truncated file, wrong shape, uncovered region) is an
error that names the tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "megads-checkpoint"
VERSION = 1
INDEX = "index.json"
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                                     torch.int64, torch.int32, torch.uint8, torch.float8_e4m3fn)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the tensor or file."""


@dataclass
class Piece:
    """A slice of the global tensor `name` [global_shape] starting at `offset`."""

    name: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    tensor: torch.Tensor

    @property
    def key(self) -> str:
        return f"{self.name}@{','.join(map(str, self.offset))}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PieceWriter:
    """Writes pieces into `<prefix>-<k>.safetensors` files of at most ~max_bytes each, streaming:
    a file is written as soon as it is full, so memory holds one file's worth of tensors."""

    def __init__(self, directory: str, prefix: str, max_bytes: int = 2 << 30):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, int] = {}
        self.tensors: dict[str, dict] = {}

    def add(self, piece: Piece) -> None:
        tensor = piece.tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[piece.key] = tensor
        self.pending_bytes += nbytes
        entry = self.tensors.setdefault(piece.name, {"shape": list(piece.global_shape), "dtype": dtype_name(tensor.dtype),
                                                     "pieces": []})
        entry["pieces"].append({"file": self._file_name(), "key": piece.key, "offset": list(piece.offset),
                                "shape": list(tensor.shape)})

    def _file_name(self) -> str:
        return f"{self.prefix}-{len(self.files)}.safetensors"

    def flush(self) -> None:
        if not self.pending:
            return
        name = self._file_name()
        path = os.path.join(self.directory, name)
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files[name] = os.path.getsize(path)
        self.pending, self.pending_bytes = {}, 0


def merge_indexes(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Union of several writers' (files, tensors); the pieces of a tensor are concatenated."""
    files: dict[str, int] = {}
    tensors: dict[str, dict] = {}
    for part_files, part_tensors in parts:
        files.update(part_files)
        for name, entry in part_tensors.items():
            merged = tensors.setdefault(name, {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": []})
            if merged["shape"] != entry["shape"]:
                raise CheckpointError(f"tensor {name} was written with shapes {merged['shape']} and {entry['shape']}")
            merged["pieces"].extend(entry["pieces"])
    return files, tensors


def write_index(directory: str, files: dict, tensors: dict, metadata: dict) -> None:
    for name, entry in tensors.items():
        covered = sum(_numel(p["shape"]) for p in entry["pieces"])
        if covered != _numel(entry["shape"]):
            raise CheckpointError(f"tensor {name}: pieces cover {covered} of {_numel(entry['shape'])} elements")
    index = {"format": FORMAT, "version": VERSION, "metadata": metadata, "files": files,
             "tensors": dict(sorted(tensors.items()))}
    write_atomic(os.path.join(directory, INDEX), json.dumps(index, indent=1))


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def first_names(names: list[str], shown: int = 3) -> str:
    """"a, b, c and 4 more": the first names of a list and a count of the rest."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class CheckpointReader:
    """Reads regions of global tensors from a checkpoint directory, verifying as it goes."""

    def __init__(self, path: str):
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise CheckpointError(f"{path} is not a megads checkpoint: it has no {INDEX} "
                                  f"(an unfinished save leaves only a .tmp directory)")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise CheckpointError(f"{index_path}: format {index.get('format')!r} version {index.get('version')!r}, "
                                  f"expected {FORMAT!r} version {VERSION}")
        self.path = path
        self.metadata: dict = index["metadata"]
        self.tensors: dict[str, dict] = index["tensors"]
        self.files: dict[str, int] = index["files"]
        self._handles: dict = {}
        self._verify_files()

    def _verify_files(self) -> None:
        for name, expected in self.files.items():
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint {self.path} is missing {name}, which holds {self._held_by(name)}")
            size = os.path.getsize(path)
            if size != expected:
                raise CheckpointError(f"checkpoint file {path} is truncated or damaged ({size} bytes, the index says "
                                      f"{expected}); it holds {self._held_by(name)}")

    def _held_by(self, file: str) -> str:
        names = [n for n, e in self.tensors.items() if any(p["file"] == file for p in e["pieces"])]
        return "tensor " + first_names(names) if names else "no tensor"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name}")
        return self.tensors[name]

    def read(self, name: str, offset: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None,
             expect_global: tuple[int, ...] | None = None) -> torch.Tensor:
        """The region [offset, offset + shape) of global tensor `name` (the whole tensor by default)."""
        entry = self._entry(name)
        global_shape = tuple(entry["shape"])
        if expect_global is not None and tuple(expect_global) != global_shape:
            raise CheckpointError(f"tensor {name} has shape {list(global_shape)} in checkpoint {self.path} but "
                                  f"{list(expect_global)} in this model")
        offset = tuple(offset) if offset is not None else (0,) * len(global_shape)
        shape = tuple(shape) if shape is not None else global_shape
        out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
        filled = 0
        for piece in entry["pieces"]:
            lo = [max(o, p) for o, p in zip(offset, piece["offset"])]
            hi = [min(o + s, p + q) for o, s, p, q in zip(offset, shape, piece["offset"], piece["shape"])]
            if any(a >= b for a, b in zip(lo, hi)) and len(shape) > 0:
                continue
            src = tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, piece["offset"]))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
            out[dst] = self._slice(name, piece, src)
            filled += _numel([b - a for a, b in zip(lo, hi)])
        if filled != out.numel():
            raise CheckpointError(f"checkpoint {self.path} covers {filled} of the {out.numel()} elements of tensor "
                                  f"{name} at offset {list(offset)} shape {list(shape)}; a piece is missing")
        return out

    def _slice(self, name: str, piece: dict, region: tuple[slice, ...]) -> torch.Tensor:
        file = piece["file"]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
            except Exception as err:
                raise CheckpointError(f"cannot read {file} of checkpoint {self.path} (tensor {name}): {err}") from err
        try:
            view = self._handles[file].get_slice(piece["key"])
        except Exception as err:
            raise CheckpointError(f"checkpoint file {file} lacks the piece {piece['key']} of tensor {name}") from err
        if list(view.get_shape()) != piece["shape"]:
            raise CheckpointError(f"tensor {name}: piece {piece['key']} in {file} has shape {view.get_shape()}, "
                                  f"the index says {piece['shape']}")
        return view[region] if region else view[:]
