"""megads' on-disk checkpoint format: global tensors stored as pieces, with an index.

A checkpoint is a directory:

    index.json                 what the checkpoint holds (see below)
    trainer.pt                 trainer state that is not a tensor of the model (training checkpoints)
    <prefix>-<k>.safetensors   pieces: rectangular slices of global tensors
    tokenizer/                 tokenizer files, when a conversion brought them (listed in "files")

`index.json` (version 2):

    {"format": "megads-checkpoint", "version": 2,
     "index_sha256": "9f2c...",                          # sha256 of the index without this field (see below)
     "metadata": {...},                                  # step, layout that wrote it, model config,
                                                         # "trainer_state": true for training checkpoints
     "files": {"rank00003-0.safetensors": {"bytes": 123456, "sha256": "1a4e..."}, ...,
               "trainer.pt": {...}},                     # every file, with its size and sha256
     "tensors": {"model.layers.1.mlp.experts.gate_proj": {
         "shape": [8, 32, 64], "dtype": "float32",       # the global tensor
         "pieces": [{"file": ..., "key": ..., "offset": [4, 0, 0], "shape": [4, 32, 64]}, ...]}}}

A file's sha256 is that of its bytes (`sha256sum` prints the same); it is computed from the
tensors in memory as they are written, so saving reads no data back. The index protects itself:
`index_sha256` is the sha256 of `json.dumps(index without it, sort_keys=True,
separators=(",", ":"))`, so an edited dtype, step or piece entry is detected. Version 1 (sizes
only, no checksums) still loads.

The pieces of one tensor lie inside its global shape, are disjoint and cover it exactly; this
is checked when the index is written and when it is read. How a tensor was cut (by TP, EP or
not at all) is a property of the run that wrote it and nothing else depends on it. A reader
asks for any rectangular region of a global tensor and gets it assembled from the pieces
that overlap it, reading only those bytes (safetensors slices are memory-mapped).
Every inconsistency is a `CheckpointError` naming the checkpoint, the file (or tensor) and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "megads-checkpoint"
VERSION = 2
INDEX = "index.json"
TRAINER_STATE = "trainer.pt"
TOKENIZER_DIR = "tokenizer"
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                                     torch.int64, torch.int32, torch.uint8, torch.float8_e4m3fn)}
DATA_FIX = "restore the file from a copy of this checkpoint or resume from an earlier checkpoint"
INDEX_FIX = f"restore {INDEX} from a copy of this checkpoint or resume from an earlier checkpoint"
TRAINER_FIX = ("resume from an earlier checkpoint, or set checkpoint.weights_only=true to load only its weights "
               "(step 0, new optimizer state)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or saved as asked; the one-line message names the
    checkpoint, the file or tensor, and the fix."""


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


def one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages may span several)."""
    return " ".join(str(err).split())


def write_bytes(path: str, data: bytes) -> dict:
    """Write `data` to `path`; its index entry {"bytes", "sha256"}, hashed from memory (no read-back)."""
    with open(path, "wb") as f:
        f.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write contiguous CPU tensors as a safetensors file; its index entry {"bytes", "sha256"}.

    The sha256 is computed without reading the data back: a safetensors file is an 8-byte header
    size, the JSON header (read back: a few KB) and then every tensor's raw bytes, contiguous in
    the order of their data offsets, which are hashed from memory. (Serialising to a bytes object
    first would cost a copy of the file, several times the hashing.)"""
    save_file(tensors, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        size = f.read(8)
        header = f.read(struct.unpack("<Q", size)[0])
    digest = hashlib.sha256(size + header)
    entries = {key: value for key, value in json.loads(header).items() if key != "__metadata__"}
    for key in sorted(entries, key=lambda k: entries[k]["data_offsets"][0]):
        digest.update(tensors[key].reshape(-1).view(torch.uint8).numpy())
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PieceWriter:
    """Writes pieces into `<prefix>-<k>.safetensors` files of at most ~max_bytes each, streaming:
    a file is written as soon as it is full, so memory holds one file's worth of tensors."""

    def __init__(self, directory: str, prefix: str, max_bytes: int = 2 << 30):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, dict] = {}
        self.tensors: dict[str, dict] = {}

    @property
    def total_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.files.values())

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
        self.files[name] = write_safetensors(os.path.join(self.directory, name), self.pending)
        self.pending, self.pending_bytes = {}, 0


def merge_indexes(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Union of several writers' (files, tensors); the pieces of a tensor are concatenated."""
    files: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    for part_files, part_tensors in parts:
        files.update(part_files)
        for name, entry in part_tensors.items():
            merged = tensors.setdefault(name, {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": []})
            if merged["shape"] != entry["shape"]:
                raise CheckpointError(f"tensor {name} was written with shapes {merged['shape']} and {entry['shape']}")
            merged["pieces"].extend(entry["pieces"])
    return files, tensors


def index_digest(index: dict) -> str:
    """sha256 of the index's canonical JSON without its own digest field."""
    body = {key: value for key, value in index.items() if key != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_index(directory: str, files: dict, tensors: dict, metadata: dict) -> None:
    """Write index.json for the files ({"bytes", "sha256"} each) and tensors written into `directory`;
    refuses tensors whose pieces do not tile them (a bug of the writer, caught before it is published)."""
    for name, entry in tensors.items():
        problem = tiling_problem(entry)
        if problem is not None:
            raise CheckpointError(f"cannot write {INDEX} of {directory}: the pieces of tensor {name} do not tile "
                                  f"its shape {entry['shape']}: {problem}")
    index = {"format": FORMAT, "version": VERSION, "metadata": metadata, "files": dict(sorted(files.items())),
             "tensors": dict(sorted(tensors.items()))}
    index = {"index_sha256": index_digest(index), **index}
    write_atomic(os.path.join(directory, INDEX), json.dumps(index, indent=1))


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tiling_problem(entry: dict) -> str | None:
    """Why the pieces of a tensor entry do not tile its global shape exactly, or None when they do.

    The boundaries of all pieces cut every axis into intervals, and so the tensor into a grid of
    cells [c0, c1, ...]; the pieces tile the tensor exactly when each lies inside the shape and
    every cell is covered once (0: a gap, 2 or more: an overlap). Summing sizes is not enough:
    an overlap and a gap of the same size cancel out."""
    shape = entry["shape"]
    for piece in entry["pieces"]:
        offset, size = piece["offset"], piece["shape"]
        if len(offset) != len(shape) or len(size) != len(shape) or \
                any(o < 0 or s < 0 or o + s > g for o, s, g in zip(offset, size, shape)):
            return f"piece {piece['key']} (offset {offset}, shape {size}) lies outside it"
    cuts = [sorted({0, g} | {p["offset"][d] for p in entry["pieces"]} |
                   {p["offset"][d] + p["shape"][d] for p in entry["pieces"]}) for d, g in enumerate(shape)]
    cell = [{c: i for i, c in enumerate(axis)} for axis in cuts]
    counts = torch.zeros([len(axis) - 1 for axis in cuts], dtype=torch.int32)
    for piece in entry["pieces"]:
        counts[tuple(slice(at[o], at[o + s]) for at, o, s in zip(cell, piece["offset"], piece["shape"]))] += 1
    problems = []
    for wrong, what in ((counts > 1, "pieces overlap at offset"), (counts == 0, "no piece covers offset")):
        if wrong.any():
            first = wrong.nonzero()[0].tolist()
            problems.append(f"{what} {[axis[i] for axis, i in zip(cuts, first)]}")
    return " and ".join(problems) or None


def first_names(names: list[str], shown: int = 3) -> str:
    """"a, b, c and 4 more": the first names of a list and a count of the rest."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class CheckpointReader:
    """Reads regions of global tensors from a checkpoint directory.

    Opening checks everything that costs no reading of the data: the index (format, its own
    digest, structure), that the pieces of every tensor tile it, and that every file holding
    pieces exists with its recorded size. `verify(files)` checks the files' sha256 (reading
    them once); loading calls it before any tensor is used (see `sharded.open_checkpoint`)."""

    def __init__(self, path: str):
        self.path = path
        index = self._read_index()
        self.version: int = index["version"]
        try:
            self.metadata: dict = index["metadata"]
            self.tensors: dict[str, dict] = index["tensors"]
            self.files: dict[str, dict] = {name: entry if isinstance(entry, dict) else {"bytes": entry, "sha256": None}
                                           for name, entry in index["files"].items()}
            self._check_tensors()
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path}: {INDEX} is malformed (no or wrong field {one_line(err)}); "
                                  f"{INDEX_FIX}") from err
        self._handles: dict = {}
        for name in self.data_files():
            problem = self.file_problem(name, checksum=False)
            if problem is not None:
                raise CheckpointError(problem)

    def _read_index(self) -> dict:
        index_path = os.path.join(self.path, INDEX)
        if not os.path.isfile(index_path):
            raise CheckpointError(f"{self.path} is not a megads checkpoint: it has no {INDEX} "
                                  f"(an unfinished save leaves only a .tmp directory)")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (ValueError, OSError) as err:
            raise CheckpointError(f"checkpoint file {index_path} is not readable JSON ({one_line(err)}): it is "
                                  f"truncated or damaged; {INDEX_FIX}") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") not in (1, VERSION):
            found = (index.get("format"), index.get("version")) if isinstance(index, dict) else (None, None)
            raise CheckpointError(f"{index_path}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} "
                                  f"version 1 or {VERSION}; point checkpoint.resume at a megads checkpoint")
        if index["version"] >= 2 and index.get("index_sha256") != index_digest(index):
            raise CheckpointError(f"checkpoint file {index_path} was changed after it was written (its index_sha256 "
                                  f"does not match its content); {INDEX_FIX}")
        return index

    def _check_tensors(self) -> None:
        """Every tensor has a known dtype, pieces in listed files, and pieces that tile it."""
        for name, entry in self.tensors.items():
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"checkpoint {self.path}: tensor {name} has dtype {entry['dtype']!r} in {INDEX}, "
                                      f"which megads does not store; {INDEX_FIX}")
            unlisted = [p["file"] for p in entry["pieces"] if p["file"] not in self.files]
            if unlisted:
                raise CheckpointError(f"checkpoint {self.path}: tensor {name} has a piece in {unlisted[0]}, which "
                                      f"{INDEX} does not list; {INDEX_FIX}")
            problem = tiling_problem(entry)
            if problem is not None:
                raise CheckpointError(f"checkpoint {self.path}: the pieces of tensor {name} in {INDEX} do not tile "
                                      f"its shape {entry['shape']}: {problem}; the checkpoint was written wrongly, "
                                      f"resume from an earlier checkpoint")

    @property
    def has_checksums(self) -> bool:
        return self.version >= 2

    @property
    def has_trainer_state(self) -> bool:
        """Whether the checkpoint was saved with trainer state (a training checkpoint), rather than
        holding weights only (converted). Version 1 did not record it: its training checkpoints
        are those with a recorded layout."""
        if self.version >= 2:
            return bool(self.metadata.get("trainer_state", False))
        return "layout" in self.metadata

    def data_files(self) -> list[str]:
        """The files that hold pieces, sorted."""
        return sorted({p["file"] for entry in self.tensors.values() for p in entry["pieces"]})

    def file_problem(self, name: str, checksum: bool = True) -> str | None:
        """What is wrong with file `name` (missing, size or sha256 unlike the index), or None."""
        path = os.path.join(self.path, name)
        what, fix = self._held_by(name), TRAINER_FIX if name == TRAINER_STATE else DATA_FIX
        if not os.path.isfile(path):
            return f"checkpoint {self.path} is missing {name}, which holds {what}; {fix}"
        expected = self.files.get(name)
        if expected is None:
            return None
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            return (f"checkpoint file {path} is truncated or damaged ({size} bytes, the index says "
                    f"{expected['bytes']}); it holds {what}; {fix}")
        if not checksum or expected["sha256"] is None:
            return None
        try:
            digest = file_sha256(path)
        except OSError as err:
            return f"cannot read checkpoint file {path} ({one_line(err)}); it holds {what}; {fix}"
        if digest != expected["sha256"]:
            return (f"checkpoint file {path} is damaged: its sha256 is {digest}, the index recorded "
                    f"{expected['sha256']} at save; it holds {what}; {fix}")
        return None

    def verify(self, names: list[str] | None = None) -> None:
        """Raise on the first of the files `names` (default: all that hold pieces) that is missing or
        whose size or sha256 differs from the index (version 1: existence and size only)."""
        for name in self.data_files() if names is None else names:
            problem = self.file_problem(name)
            if problem is not None:
                raise CheckpointError(problem)

    def _held_by(self, file: str) -> str:
        if file == TRAINER_STATE:
            return "the trainer state (step, data position, RNG states)"
        if file.startswith(TOKENIZER_DIR + "/"):
            return "the tokenizer"
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
        """The region [offset, offset + shape) of global tensor `name` (the whole tensor by default);
        the pieces tile the tensor (checked on opening), so the region is filled exactly once."""
        entry = self._entry(name)
        global_shape = tuple(entry["shape"])
        if expect_global is not None and tuple(expect_global) != global_shape:
            raise CheckpointError(f"tensor {name} has shape {list(global_shape)} in checkpoint {self.path} but "
                                  f"{list(expect_global)} in this model")
        offset = tuple(offset) if offset is not None else (0,) * len(global_shape)
        shape = tuple(shape) if shape is not None else global_shape
        out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
        for piece in entry["pieces"]:
            lo = [max(o, p) for o, p in zip(offset, piece["offset"])]
            hi = [min(o + s, p + q) for o, s, p, q in zip(offset, shape, piece["offset"], piece["shape"])]
            if any(a >= b for a, b in zip(lo, hi)) and len(shape) > 0:
                continue
            src = tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, piece["offset"]))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
            out[dst] = self._slice(name, piece, src, out.dtype)
        return out

    def _slice(self, name: str, piece: dict, region: tuple[slice, ...], dtype: torch.dtype) -> torch.Tensor:
        file = piece["file"]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
            except Exception as err:
                raise CheckpointError(f"cannot read {file} of checkpoint {self.path} (tensor {name}): "
                                      f"{one_line(err)}; {DATA_FIX}") from err
        try:
            view = self._handles[file].get_slice(piece["key"])
        except Exception as err:
            raise CheckpointError(f"checkpoint file {file} of {self.path} lacks the piece {piece['key']} of tensor "
                                  f"{name}; {DATA_FIX}") from err
        if list(view.get_shape()) != piece["shape"]:
            raise CheckpointError(f"tensor {name}: piece {piece['key']} in {file} of {self.path} has shape "
                                  f"{view.get_shape()}, the index says {piece['shape']}; {DATA_FIX}")
        value = view[region] if region else view[:]
        if value.dtype != dtype:
            raise CheckpointError(f"tensor {name}: piece {piece['key']} in {file} of {self.path} is "
                                  f"{dtype_name(value.dtype)}, the index says {dtype_name(dtype)}; {DATA_FIX}")
        return value
