"""What checkpoint checksums cost: save and load of a checkpoint of the bench model with and
without the per-file sha256, through megads' own writer and reader.

    python benchmarks/checkpoint_checksum.py [--scale 1.0] [--dir DIR] [--json results.json]

The checkpoint is that of `configs/bench-h100.yaml`'s model (2.37B parameters) after a step:
fp32 weights and router biases plus both AdamW moments of every parameter, ~28 GB, with the
real global names and shapes (`--scale s` multiplies every tensor's first dimension by s, to
run it smaller). Random tensors are written one at a time through `PieceWriter` (files of
~2 GiB, so memory holds one file's worth) and `write_index`, and read back through
`CheckpointReader`; the files are deleted at the end. Measured:

- save, with checksums: megads' `PieceWriter` (serialise a file to bytes, sha256 them, write);
- save, without: the write path before checksums (safetensors `save_file`, sizes only);
- load, verified: open the reader, sha256 every file (`verify`), read every tensor in full;
- load, not verified (`checkpoint.verify=false`): open the reader, read every tensor in full.

Generating the random values is not timed. A save's time is what `save_checkpoint` waits for
(files written, not yet flushed to disk), and `seconds_to_disk` adds the fsync of its files.
Before each load the files are dropped from the page cache (posix_fadvise), so that the load
reads from the disk, as far as the kernel's cache and the machine's allow. GB = 1e9 bytes. One
process does all the hashing here; a multi-rank load splits the files over the ranks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.checkpoint.format import CheckpointReader, Piece, PieceWriter, write_index  # noqa: E402
from megads.checkpoint.layout import MODEL, MOMENTS, OPTIMIZER, expected_tensors  # noqa: E402
from megads.config import load_config  # noqa: E402
from megads.model.deepseek_v3 import DeepSeekV3  # noqa: E402


class UncheckedWriter(PieceWriter):
    """The write path before checksums: safetensors writes the file, the index records its size."""

    def flush(self) -> None:
        if not self.pending:
            return
        name = self._file_name()
        path = os.path.join(self.directory, name)
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files[name] = {"bytes": os.path.getsize(path), "sha256": None}
        self.pending, self.pending_bytes = {}, 0


def bench_tensors(config: str, scale: float) -> dict[str, tuple[int, ...]]:
    """Global name -> shape of every tensor of a training checkpoint of the config's model
    (first dimension scaled)."""
    cfg = load_config(config).model
    with torch.device("meta"):
        params = [name for name, _ in DeepSeekV3(cfg).named_parameters()]
    shapes = {MODEL + name: shape for name, shape in expected_tensors(cfg).items()}
    shapes.update({f"{OPTIMIZER}{m}.{name}": shapes[MODEL + name] for name in params for m in MOMENTS})
    return {name: (max(1, round(shape[0] * scale)),) + tuple(shape[1:]) for name, shape in shapes.items()}


def save(directory: str, shapes: dict[str, tuple[int, ...]], writer_class: type[PieceWriter]) -> float:
    """Seconds spent writing the checkpoint (random values generated outside the clock)."""
    os.makedirs(directory)
    writer = writer_class(directory, "rank00000")
    seconds = 0.0
    for name, shape in shapes.items():
        value = torch.empty(shape).uniform_(-1, 1)               # [shape] fp32
        tic = time.perf_counter()
        writer.add(Piece(name, shape, (0,) * len(shape), value))
        seconds += time.perf_counter() - tic
    tic = time.perf_counter()
    writer.flush()
    write_index(directory, writer.files, writer.tensors, {"step": 1, "adam_step": 1})
    return seconds + time.perf_counter() - tic


def settle(directory: str) -> None:
    """fsync every file and drop it from the page cache, so that the next read comes from disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load(directory: str, verify: bool) -> float:
    """Seconds to open, (verify,) and read every tensor of the checkpoint in full."""
    tic = time.perf_counter()
    reader = CheckpointReader(directory)
    if verify:
        reader.verify()
    for name in reader.names():
        reader.read(name)
    return time.perf_counter() - tic


def checkpoint_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def memory_sha256_rate(nbytes: int = 1 << 30) -> float:
    """GB/s of hashlib's sha256 over bytes in memory (no I/O)."""
    data = os.urandom(nbytes)
    tic = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return nbytes / (time.perf_counter() - tic) / 1e9


def run(args: argparse.Namespace) -> dict:
    shapes = bench_tensors(args.config, args.scale)
    need = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    root = tempfile.mkdtemp(prefix="megads-checksum-bench-", dir=args.dir)
    if shutil.disk_usage(root).free < need * 1.05:
        shutil.rmtree(root)
        raise SystemExit(f"{root}: {need / 1e9:.1f} GB needed, {shutil.disk_usage(root).free / 1e9:.1f} GB free; "
                         f"use --scale or --dir")
    results: dict = {"config": args.config, "scale": args.scale, "tensors": len(shapes),
                     "sha256_in_memory_GBps": round(memory_sha256_rate(), 2)}
    try:
        unchecked, checked = os.path.join(root, "without"), os.path.join(root, "with")
        results["save_without"] = measure_save(unchecked, shapes, UncheckedWriter)
        shutil.rmtree(unchecked)                      # one checkpoint on disk at a time
        results["save_with"] = measure_save(checked, shapes, PieceWriter)
        for verify in (False, True):
            settle(checked)
            key = "load_verified" if verify else "load_not_verified"
            results[key] = timing(load(checked, verify), checkpoint_bytes(checked))
            print(f"{key}: {results[key]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def measure_save(directory: str, shapes: dict[str, tuple[int, ...]], writer_class: type[PieceWriter]) -> dict:
    """The save's seconds as `save_checkpoint` sees them, and until the files are on disk (fsync)."""
    seconds = save(directory, shapes, writer_class)
    tic = time.perf_counter()
    settle(directory)
    result = timing(seconds, checkpoint_bytes(directory))
    result["seconds_to_disk"] = round(seconds + time.perf_counter() - tic, 1)
    print(f"save with {writer_class.__name__}: {result}", flush=True)
    return result


def timing(seconds: float, nbytes: int) -> dict:
    return {"seconds": round(seconds, 1), "GB": round(nbytes / 1e9, 2), "GBps": round(nbytes / seconds / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench-h100.yaml")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every tensor's first dimension")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temporary directory)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = run(args)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
