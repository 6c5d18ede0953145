"""Checkpoint files on a shared filesystem: atomic writes, a `latest` pointer, keep-last-K.

A checkpoint is a directory `step_XXXXXXXX/` holding one `rank_XXXXX.pt` per rank. Every rank
writes into `step_XXXXXXXX.tmp/`; once all have written, rank 0 renames it and updates
`latest`, so a checkpoint directory only ever appears complete.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def save_checkpoint(ckpt_dir: str, step: int, state: dict, keep_last: int, rank: int = 0, world_size: int = 1) -> str:
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world_size)
    torch.save(state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    _barrier(world_size)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
        for old in _complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    _barrier(world_size)
    return final


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint `latest` points to (or the newest complete one if the pointer is missing)."""
    pointer = os.path.join(ckpt_dir, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(ckpt_dir, f.read().strip())
        if os.path.isdir(path):
            return path
    found = _complete_checkpoints(ckpt_dir)
    return os.path.join(ckpt_dir, found[-1]) if found else None


def load_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> dict:
    files = sorted(f for f in os.listdir(path) if f.startswith("rank_")) if os.path.isdir(path) else []
    if len(files) != world_size:
        raise ValueError(f"checkpoint {path} holds {len(files)} rank files but this run has {world_size} ranks; "
                         f"resume with the layout that wrote it")
    return torch.load(os.path.join(path, f"rank_{rank:05d}.pt"), map_location="cpu", weights_only=False)


def _complete_checkpoints(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if _STEP_DIR.match(d))


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
