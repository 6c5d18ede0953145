"""Checkpoint files on one filesystem: atomic writes, a `latest` pointer, keep-last-K.

A checkpoint is a directory `step_XXXXXXXX/` holding `state.pt`; it appears only once complete
(written under a temporary name, then renamed), and `latest` names the newest complete one.
"""
from __future__ import annotations

import os
import re
import shutil

import torch

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def save_checkpoint(ckpt_dir: str, step: int, state: dict, keep_last: int) -> str:
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
    for old in _complete_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
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


def load_checkpoint(path: str) -> dict:
    state_file = os.path.join(path, "state.pt")
    if not os.path.exists(state_file):
        raise FileNotFoundError(f"checkpoint {path} has no state.pt; it is incomplete or not a megads checkpoint")
    return torch.load(state_file, map_location="cpu", weights_only=False)


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
