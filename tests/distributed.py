"""Run a function on N CPU ranks over gloo and collect each rank's result.

    results = run_ranks(fn, world_size=4, args=(...,), timeout=120)

`fn(rank, world_size, *args)` runs in a fresh process with the default process group
initialised (gloo, a free port); its return value (picklable) comes back per rank. A child's
exception is re-raised in the test with the child's traceback; a hang fails after `timeout`.

Ranks are forked from a server process that imported torch, DeepSpeed and megads once (the
"forkserver" start method): each rank then starts in a fraction of a second instead of paying
the seconds of those imports, and, as with "spawn", inherits no threads or state of the test.
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        buffer = io.BytesIO()               # plain bytes: no shared-memory handles that die with the child
        torch.save(fn(rank, world_size, *args), buffer)
        message = (rank, "ok", buffer.getvalue())
    except BaseException:
        message = (rank, "error", traceback.format_exc())
    queue.put(message)
    queue.close()
    queue.join_thread()          # flushed before anything at exit can take the process down
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "deepspeed", "megads.train.trainer", "megads.rl.grpo_trainer"]


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 300) -> list:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except Exception as err:
        if "Empty" in type(err).__name__:
            missing = sorted(set(range(world_size)) - set(results))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout} s") from None
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
