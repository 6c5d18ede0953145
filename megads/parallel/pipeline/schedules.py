"""Pipeline schedules as data: for every pipeline rank, the ordered list of actions it runs.

A compute action names a (chunk, micro-batch) pair; chunk c on rank r is one model stage
(`Schedule.stage_of`). Kinds:

    F    forward                         B    backward for inputs (weight gradients deferred)
    W    backward for weights (drains the weight-gradient GEMMs B deferred for that pair)
    BW   full backward (B and W at once) FB   overlapped pair: F of (chunk, mb) with BW of (b_chunk, b_mb)
    SEND_F / RECV_F   activations of (chunk, mb) to / from the next / previous hop of its path
    SEND_B / RECV_B   gradients of (chunk, mb) to / from the previous / next hop

A micro-batch walks a path of (rank, chunk) hops, one per stage. 1F1B and DualPipeV have one
path; DualPipe two (the first half of the micro-batches enters at rank 0, the second half at
rank pp-1, where every stage has a mirrored copy). Communication is inserted from the compute
order by `with_communication`: a receive right before the action that consumes it, a send right
after the action that produces it; sends are asynchronous, receives block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE = ("F", "B", "W", "BW", "FB")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Action:
    kind: str
    chunk: int
    mb: int
    b_chunk: int = -1          # FB only: the backward half
    b_mb: int = -1

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.chunk}.{self.mb}&B{self.b_chunk}.{self.b_mb}"
        return f"{self.kind}{self.chunk}.{self.mb}"


Hop = tuple[int, int]          # (pipeline rank, chunk)


@dataclass
class Schedule:
    name: str
    pp: int
    n_micro: int
    paths: list[list[Hop]]                 # paths[d][stage] = the hop that runs `stage` for direction d
    actions: list[list[Action]] = field(default_factory=list)   # per pipeline rank

    @property
    def n_stages(self) -> int:
        return len(self.paths[0])

    @property
    def splits_backward(self) -> bool:
        """Whether the schedule has B actions, whose weight gradients wait for W actions."""
        return any(a.kind == "B" for acts in self.actions for a in acts)

    def direction(self, mb: int) -> int:
        return 0 if len(self.paths) == 1 else int(mb >= self.n_micro // 2)

    def path(self, mb: int) -> list[Hop]:
        return self.paths[self.direction(mb)]

    def stage_of(self, rank: int, chunk: int) -> int:
        for path in self.paths:
            if (rank, chunk) in path:
                return path.index((rank, chunk))
        raise KeyError(f"rank {rank} holds no chunk {chunk} in {self.name}")

    def chunks(self, rank: int) -> list[int]:
        return sorted({c for path in self.paths for r, c in path if r == rank})

    def next_hop(self, rank: int, chunk: int, mb: int) -> Hop | None:
        path = self.path(mb)
        i = path.index((rank, chunk))
        return path[i + 1] if i + 1 < len(path) else None

    def prev_hop(self, rank: int, chunk: int, mb: int) -> Hop | None:
        path = self.path(mb)
        i = path.index((rank, chunk))
        return path[i - 1] if i > 0 else None

    def is_first(self, rank: int, chunk: int, mb: int) -> bool:
        return self.prev_hop(rank, chunk, mb) is None

    def is_last(self, rank: int, chunk: int, mb: int) -> bool:
        return self.next_hop(rank, chunk, mb) is None

    def tag(self, kind: str, rank: int, chunk: int, mb: int) -> int:
        """A message tag unique within one step: the receiving stage, the direction of travel, the micro-batch."""
        backward = kind.endswith("_B")
        return (int(backward) * self.n_stages + self.stage_of(rank, chunk)) * self.n_micro + mb

    def describe(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in enumerate(self.actions))


# ----------------------------------------------------------------------------- generators

def one_f_one_b(pp: int, n_micro: int) -> Schedule:
    """Non-interleaved 1F1B (PipeDream-Flush): pp-1-r warm-up forwards, then one forward and one
    full backward in turn, then the remaining backwards."""
    schedule = Schedule("1f1b", pp, n_micro, [[(r, 0) for r in range(pp)]])
    for r in range(pp):
        warmup = min(pp - 1 - r, n_micro)
        acts = [Action("F", 0, m) for m in range(warmup)]
        for i in range(n_micro - warmup):
            acts += [Action("F", 0, warmup + i), Action("BW", 0, i)]
        acts += [Action("BW", 0, m) for m in range(n_micro - warmup, n_micro)]
        schedule.actions.append(acts)
    return schedule


class _RankBuilder:
    """Counts micro-batches per chunk and keeps the FIFO of deferred weight gradients, as the
    DualPipe / DualPipeV step functions do."""

    def __init__(self, mb_base: dict[int, int]):
        self.actions: list[Action] = []
        self.next_f = dict(mb_base)
        self.next_b = dict(mb_base)
        self.pending_w: list[tuple[int, int]] = []

    def _take(self, counter: dict[int, int], chunk: int) -> int:
        counter[chunk] += 1
        return counter[chunk] - 1

    def f(self, chunk: int) -> None:
        self.actions.append(Action("F", chunk, self._take(self.next_f, chunk)))

    def b(self, chunk: int, zero_bubble: bool = False) -> None:
        mb = self._take(self.next_b, chunk)
        self.actions.append(Action("B" if zero_bubble else "BW", chunk, mb))
        if zero_bubble:
            self.pending_w.append((chunk, mb))

    def w(self) -> None:
        if self.pending_w:
            self.actions.append(Action("W", *self.pending_w.pop(0)))

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        fm, bm = self._take(self.next_f, f_chunk), self._take(self.next_b, b_chunk)
        self.actions.append(Action("FB", f_chunk, fm, b_chunk, bm))


def dualpipe(pp: int, n_micro: int) -> Schedule:
    """DualPipe (DeepSeek-V3 report, 3.2.1). Rank r holds stage r (chunk 0, the direction that
    enters at rank 0, micro-batches [0, M/2)) and stage pp-1-r (chunk 1, entering at rank pp-1,
    micro-batches [M/2, M)). The step follows DeepSeek's eight phases; `near` is the chunk whose
    entry is on this rank's half of the pipeline, `far` the other one."""
    if pp % 2 or n_micro % 2 or n_micro < 2 * pp:
        raise ValueError(f"DualPipe needs an even pp and an even number of micro-batches >= 2*pp, got pp={pp}, "
                         f"micro-batches={n_micro}")
    half_mb, half_pp = n_micro // 2, pp // 2
    schedule = Schedule("dualpipe", pp, n_micro, [[(r, 0) for r in range(pp)], [(pp - 1 - s, 1) for s in range(pp)]])
    for r in range(pp):
        h = min(r, pp - 1 - r)
        near, far = (0, 1) if r < half_pp else (1, 0)
        k = _RankBuilder({0: 0, 1: half_mb})
        for _ in range((half_pp - h - 1) * 2):          # 1: forwards of the near chunk
            k.f(near)
        for _ in range(h + 1):                          # 2: near and far forwards in turn
            k.f(near)
            k.f(far)
        for _ in range(half_pp - h - 1):                # 3: far input-backward, a weight step, a far forward
            k.b(far, zero_bubble=True)
            k.w()
            k.f(far)
        for i in range(half_mb - pp + h + 1):           # 4: the steady state of overlapped pairs
            if i == 0 and h == half_pp - 1:             # the middle ranks do not overlap the first pair
                k.f(near)
                k.b(far)
            else:
                k.fb(near, far)
            k.fb(far, near)
        for _ in range(half_pp - h - 1):                # 5: far backward, then a pair
            k.b(far)
            k.fb(far, near)
        zero_bubble = False                             # 6: backwards; the second half defers W
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                zero_bubble = True
            k.b(far, zero_bubble)
            if i == (h + 1) // 2 and h % 2 == 0:
                zero_bubble = True
            k.b(near, zero_bubble)
        for _ in range(half_pp - h - 1):                # 7: weight steps and near input-backwards
            k.w()
            k.b(near, zero_bubble=True)
        for _ in range(h + 1):                          # 8: the remaining weight steps
            k.w()
        schedule.actions.append(k.actions)
    return schedule


def dualpipev(pp: int, n_micro: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): 2*pp stages in a V, rank r holds stage r (chunk 0)
    and stage 2*pp-1-r (chunk 1); every micro-batch enters and leaves at rank 0."""
    if n_micro < 2 * pp:
        raise ValueError(f"DualPipeV needs at least 2*pp micro-batches, got pp={pp}, micro-batches={n_micro}")
    path = [(s, 0) for s in range(pp)] + [(pp - 1 - i, 1) for i in range(pp)]
    schedule = Schedule("dualpipev", pp, n_micro, [path])
    for r in range(pp):
        k = _RankBuilder({0: 0, 1: 0})
        for _ in range((pp - r - 1) * 2):               # 1: chunk-0 forwards
            k.f(0)
        for _ in range(r + 1):                          # 2: chunk-0 and chunk-1 forwards in turn
            k.f(0)
            k.f(1)
        for _ in range(pp - r - 1):                     # 3: chunk-1 input-backward, a weight step, a forward
            k.b(1, zero_bubble=True)
            k.w()
            k.f(1)
        for i in range(n_micro - 2 * pp + r + 1):       # 4: the steady state of overlapped pairs
            if i == 0 and r == pp - 1:                  # the V's tip does not overlap its first pair
                k.f(0)
                k.b(1)
            else:
                k.fb(0, 1)
            k.fb(1, 0)
        for _ in range(pp - r - 1):                     # 5: chunk-1 backward, then a pair
            k.b(1)
            k.fb(1, 0)
        zero_bubble = False                             # 6: backwards; the second half defers W
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                zero_bubble = True
            k.b(1, zero_bubble)
            if i == (r + 1) // 2 and r % 2 == 0:
                zero_bubble = True
            k.b(0, zero_bubble)
        for _ in range(pp - r - 1):                     # 7: weight steps and chunk-0 input-backwards
            k.w()
            k.b(0, zero_bubble)
        for _ in range(r + 1):                          # 8: the remaining weight steps
            k.w()
        schedule.actions.append(k.actions)
    return schedule


GENERATORS = {"1f1b": one_f_one_b, "dualpipe": dualpipe, "dualpipev": dualpipev}


def build_schedule(name: str, pp: int, n_micro: int) -> Schedule:
    """The named schedule with its communication inserted."""
    return with_communication(GENERATORS[name](pp, n_micro))


# ----------------------------------------------------------------------------- communication

def _receives(s: Schedule, rank: int, chunk: int, mb: int, backward: bool) -> list[Action]:
    hop = s.next_hop(rank, chunk, mb) if backward else s.prev_hop(rank, chunk, mb)
    return [Action("RECV_B" if backward else "RECV_F", chunk, mb)] if hop is not None and hop[0] != rank else []


def _sends(s: Schedule, rank: int, chunk: int, mb: int, backward: bool) -> list[Action]:
    hop = s.prev_hop(rank, chunk, mb) if backward else s.next_hop(rank, chunk, mb)
    return [Action("SEND_B" if backward else "SEND_F", chunk, mb)] if hop is not None and hop[0] != rank else []


def with_communication(s: Schedule) -> Schedule:
    """Insert sends and receives around the compute actions (existing ones are dropped first)."""
    out = []
    for rank, acts in enumerate(s.actions):
        seq: list[Action] = []
        for a in acts:
            if a.kind in COMM:
                continue
            if a.kind == "F":
                seq += _receives(s, rank, a.chunk, a.mb, False) + [a] + _sends(s, rank, a.chunk, a.mb, False)
            elif a.kind in ("B", "BW"):
                seq += _receives(s, rank, a.chunk, a.mb, True) + [a] + _sends(s, rank, a.chunk, a.mb, True)
            elif a.kind == "FB":
                seq += _receives(s, rank, a.chunk, a.mb, False) + _receives(s, rank, a.b_chunk, a.b_mb, True) + [a]
                seq += _sends(s, rank, a.chunk, a.mb, False) + _sends(s, rank, a.b_chunk, a.b_mb, True)
            else:
                seq.append(a)
        out.append(seq)
    return _sends_in_receive_order(Schedule(s.name, s.pp, s.n_micro, s.paths, out))


def _message(s: Schedule, rank: int, a: Action) -> tuple[int, int, str, int]:
    """(sender, receiver, direction, micro-batch) of a send or receive."""
    if a.kind.startswith("SEND"):
        hop = s.next_hop(rank, a.chunk, a.mb) if a.kind == "SEND_F" else s.prev_hop(rank, a.chunk, a.mb)
        return rank, hop[0], a.kind[-1], a.mb
    hop = s.prev_hop(rank, a.chunk, a.mb) if a.kind == "RECV_F" else s.next_hop(rank, a.chunk, a.mb)
    return hop[0], rank, a.kind[-1], a.mb


def _sends_in_receive_order(s: Schedule) -> Schedule:
    """Delay sends so that each rank sends to a peer in the order the peer receives (transports
    such as NCCL match messages between two ranks in order, whatever their tags). A send is
    asynchronous and its receiver waits for the earlier message first, so this adds no wait."""
    expected: dict[tuple[int, int], list] = {}
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if a.kind.startswith("RECV"):
                m = _message(s, rank, a)
                expected.setdefault(m[:2], []).append(m)
    out = []
    for rank, acts in enumerate(s.actions):
        seq, held, nxt = [], {}, {}
        for a in acts:
            if not a.kind.startswith("SEND"):
                seq.append(a)
                continue
            m = _message(s, rank, a)
            held[m] = a
            pair = m[:2]
            order = expected.get(pair, [])
            while nxt.get(pair, 0) < len(order) and order[nxt.get(pair, 0)] in held:
                seq.append(held.pop(order[nxt.get(pair, 0)]))
                nxt[pair] = nxt.get(pair, 0) + 1
        seq += held.values()            # sends nobody receives: left for the simulator to reject
        out.append(seq)
    return Schedule(s.name, s.pp, s.n_micro, s.paths, out)


def forward_pass(s: Schedule, n_micro: int) -> Schedule:
    """A forward-only schedule (evaluation) on the paths of `s`: every rank runs the forwards of
    one micro-batch after the other, each hop as soon as its input arrives."""
    fwd = Schedule(s.name, s.pp, n_micro, s.paths)
    fwd.actions = [[Action("F", c, m) for m in range(n_micro) for r, c in fwd.path(m) if r == rank]
                   for rank in range(s.pp)]
    return with_communication(fwd)
