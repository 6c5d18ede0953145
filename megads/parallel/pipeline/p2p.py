"""Point-to-point transport between pipeline ranks: asynchronous sends, blocking receives.

Messages carry a tag unique within a step (`Schedule.tag`), so that activations and gradients
travelling between the same two ranks in either direction never match the wrong receive.
Peers are pipeline indices; the global rank is the one at that index in this rank's pp group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class P2P:
    def __init__(self, pp_ranks: list[int]):
        self.pp_ranks = pp_ranks            # global rank of every pipeline index (same dp, tp position)
        self.pending: list = []

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending.append((dist.isend(tensor, self.pp_ranks[peer], tag=tag), tensor))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, peer: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buffer, self.pp_ranks[peer], tag=tag).wait()
        return buffer

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []
