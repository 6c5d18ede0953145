"""The environment the launcher gives every rank. Each variable is a default: a value already set
in the caller's environment wins, so `NCCL_DEBUG=INFO sbatch slurm/pretrain.sh ...` just works.

docs/launch.md explains each choice.
"""
from __future__ import annotations

import os
from collections.abc import Mapping


def rank_environment(env: Mapping[str, str], nproc_per_node: int, cpus: int, log_dir: str | None) -> dict[str, str]:
    """`env` plus the megads defaults for `nproc_per_node` ranks sharing `cpus` CPUs."""
    defaults = {
        # CPU threads per rank: the node's CPUs split evenly, so ranks do not oversubscribe cores.
        "OMP_NUM_THREADS": str(max(1, cpus // nproc_per_node)),
        # MoE dispatch buffers change size every step (uneven all-to-all splits); expandable
        # segments stop the caching allocator from fragmenting on them.
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        # Flight recorder: each rank keeps its last collectives and dumps them when one times
        # out, which names the rank and the collective a hung all-to-all waits on.
        "TORCH_FR_BUFFER_SIZE": "20000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        # Log lines reach the (file-backed) job output as they are written, not a buffer later.
        "PYTHONUNBUFFERED": "1",
        # NCCL's warnings (a fallback from InfiniBand to sockets, a wrong interface) reach the logs.
        "NCCL_DEBUG": "WARN",
    }
    if log_dir is not None:
        defaults["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(os.path.abspath(log_dir), "nccl_trace_rank_")
    return {**defaults, **env}
