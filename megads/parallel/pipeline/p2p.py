"""Point-to-point transport between pipeline ranks: asynchronous sends, blocking receives.

Messages carry a tag unique within a step (`Schedule.tag`), so that activations and gradients
travelling between the same two ranks in either direction never match the wrong receive under
gloo. NCCL ignores tags and runs all operations of one communicator in issue order on one
stream: if a rank's sends to a peer shared a communicator with its receives from that peer, a
send queued behind a receive would wait for it, and the bidirectional schedules (DualPipe,
DualPipeV), where both neighbours send to each other, could deadlock. So every direction
between two neighbouring stages has its own two-rank group: a rank sends to a peer on the group
of (rank -> peer) and receives on the group of (peer -> rank), and within one direction messages
match in send order (the simulator rejects a schedule whose sends are out of the receiver's order).
NCCL creates a pair's communicator at its first use and blocks until both ranks arrive; the
ranks' first uses of the two directions come in different orders, so `build_p2p` makes every
group's first exchange at build time, in one global order.
Peers are pipeline indices; the global rank is the one at that index in this rank's pp group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.parallel.mesh import Mesh


class P2P:
    def __init__(self, pp_ranks: list[int], pp_rank: int = 0, groups: dict[tuple[int, int], object] | None = None):
        self.pp_ranks = pp_ranks            # global rank of every pipeline index (same dp, tp position)
        self.pp_rank = pp_rank
        self.groups = groups or {}          # (source, destination) pipeline indices -> their group
        self.pending: list = []

    def _group(self, source: int, destination: int):
        if self.groups and (source, destination) not in self.groups:
            raise ValueError(f"pipeline rank {source} cannot send to pipeline rank {destination}: only neighbouring "
                             f"stages exchange activations and gradients")
        return self.groups.get((source, destination))

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        group = self._group(self.pp_rank, peer)
        self.pending.append((dist.isend(tensor, self.pp_ranks[peer], group=group, tag=tag), tensor))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, peer: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buffer, self.pp_ranks[peer], group=self._group(peer, self.pp_rank), tag=tag).wait()
        return buffer

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def build_p2p(mesh: Mesh) -> P2P:
    """This rank's transport, with a group per direction between neighbouring pipeline ranks
    (collective: every rank creates every group, in the same order)."""
    stage_size = mesh.dp * mesh.tp
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    groups = {}
    for i in range(stage_size):
        for a in range(mesh.pp - 1):
            for source, destination in ((a, a + 1), (a + 1, a)):
                group = dist.new_group([a * stage_size + i, (a + 1) * stage_size + i])
                if i == mesh.stage_index and mesh.pp_rank in (a, a + 1):
                    groups[(source, destination)] = group
    for (source, destination), group in sorted(groups.items(), key=lambda kv: (min(kv[0]), kv[0])):
        peer = mesh.ranks["pp"][destination if source == mesh.pp_rank else source]
        ping, pong = torch.zeros(1, device=device), torch.empty(1, device=device)
        ops = [dist.P2POp(dist.isend, ping, peer, group), dist.P2POp(dist.irecv, pong, peer, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return P2P(mesh.ranks["pp"], mesh.pp_rank, groups)
