"""Run a schedule without a model: check it and time it.

`simulate(schedule, times)` executes every rank's action list with the executor's rules —
sends are asynchronous, a receive waits for its matching send, a compute action needs its
inputs on this rank — and raises `ScheduleError` naming the action that cannot run (a missing
or unmatched receive, an action before the one it depends on, a deadlock). With durations for
F, B, W and the overlapped pair it returns every action's start and end and each rank's bubble.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megads.parallel.pipeline.schedules import COMM, Action, Schedule


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the rank and the action."""


@dataclass(frozen=True)
class Times:
    f: float = 1.0              # forward of one chunk
    b: float = 1.0              # backward for inputs
    w: float = 1.0              # backward for weights
    fb: float | None = None     # an overlapped F&B pair (F + B + W when not given)
    comm: float = 0.0           # latency of one send -> receive

    def of(self, kind: str) -> float:
        return {"F": self.f, "B": self.b, "W": self.w, "BW": self.b + self.w,
                "FB": self.fb if self.fb is not None else self.f + self.b + self.w}.get(kind, 0.0)


@dataclass
class Timeline:
    spans: list[list[tuple[Action, float, float]]] = field(default_factory=list)   # per rank (action, start, end)

    @property
    def makespan(self) -> float:
        return max((end for rank in self.spans for _, _, end in rank), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for _, start, end in self.spans[rank])

    def bubble(self, rank: int) -> float:
        """Idle time of `rank` within the step (the step's length minus its compute)."""
        return self.makespan - self.busy(rank)


def _peer(s: Schedule, rank: int, a: Action) -> tuple[int, int]:
    """The (rank, chunk) on the other side of a send or receive."""
    hop = {"SEND_F": s.next_hop, "RECV_F": s.prev_hop, "SEND_B": s.prev_hop, "RECV_B": s.next_hop}[a.kind](rank, a.chunk, a.mb)
    if hop is None or hop[0] == rank:
        raise ScheduleError(f"rank {rank}: {a} has no peer on another rank (chunk {a.chunk} of micro-batch {a.mb} "
                            f"{'ends' if a.kind in ('SEND_F', 'RECV_B') else 'starts'} here or stays on this rank)")
    return hop


def _halves(a: Action) -> list[tuple[str, int, int]]:
    if a.kind == "FB":
        return [("F", a.chunk, a.mb), ("BW", a.b_chunk, a.b_mb)]
    return [(a.kind, a.chunk, a.mb)]


def _check_complete(s: Schedule) -> None:
    """Every hop runs F, B and W of every micro-batch of its path exactly once."""
    for rank, acts in enumerate(s.actions):
        seen: dict[tuple[str, int, int], int] = {}
        for a in acts:
            for kind, c, m in _halves(a):
                for part in (("B", "W") if kind == "BW" else (kind,)):
                    if part in ("F", "B", "W"):
                        seen[(part, c, m)] = seen.get((part, c, m), 0) + 1
        for m in range(s.n_micro):
            for r, c in s.path(m):
                if r != rank:
                    continue
                for part in ("F", "B", "W"):
                    count = seen.pop((part, c, m), 0)
                    if count != 1:
                        raise ScheduleError(f"rank {rank}: {part}{c}.{m} runs {count} times; every hop needs it once")
        if seen:
            part, c, m = next(iter(seen))
            raise ScheduleError(f"rank {rank}: {part}{c}.{m} is not on the path of micro-batch {m}")


def _check_matched(s: Schedule) -> None:
    """Every send has exactly one receive on its peer and the other way round."""
    sends, recvs = {}, {}
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if a.kind.startswith("SEND"):
                peer = _peer(s, rank, a)
                key = (a.kind[-1], rank, peer[0], a.mb, s.stage_of(*peer))
                if key in sends:
                    raise ScheduleError(f"rank {rank}: {a} is sent twice")
                sends[key] = (rank, a)
            elif a.kind.startswith("RECV"):
                peer = _peer(s, rank, a)
                key = (a.kind[-1], peer[0], rank, a.mb, s.stage_of(rank, a.chunk))
                if key in recvs:
                    raise ScheduleError(f"rank {rank}: {a} is received twice")
                recvs[key] = (rank, a)
    for key, (rank, a) in sends.items():
        if key not in recvs:
            raise ScheduleError(f"rank {rank}: {a} has no matching receive on rank {key[2]}")
    for key, (rank, a) in recvs.items():
        if key not in sends:
            raise ScheduleError(f"rank {rank}: {a} has no matching send on rank {key[1]}")
    _check_pair_order(s)


def _check_pair_order(s: Schedule) -> None:
    """Between two ranks, messages are received in the order they are sent (NCCL's matching)."""
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if a.kind in COMM:
                peer = _peer(s, rank, a)[0]
                book, pair = (sent, (rank, peer)) if a.kind.startswith("SEND") else (received, (peer, rank))
                book.setdefault(pair, []).append((a.kind[-1], a.mb, rank, a))
    for (src, dst), msgs in sent.items():
        for (d1, m1, _, a), (d2, m2, _, b) in zip(msgs, received.get((src, dst), [])):
            if (d1, m1) != (d2, m2):
                raise ScheduleError(f"rank {src} sends {a} to rank {dst} where rank {dst} receives {b} first: "
                                    f"messages between two ranks must be received in the order they are sent")


def simulate(s: Schedule, times: Times = Times()) -> Timeline:
    """Check `s` and time it. Raises ScheduleError naming the first action that cannot run."""
    _check_complete(s)
    timeline = _run(s, times)
    _check_matched(s)
    return timeline


def _run(s: Schedule, times: Times) -> Timeline:
    n = s.pp
    pos, clock = [0] * n, [0.0] * n
    done: list[dict] = [{} for _ in range(n)]          # per rank: ("F"|"B"|"W", chunk, mb) -> end time
    arrived: list[dict] = [{} for _ in range(n)]       # per rank: ("F"|"B", chunk, mb) -> time the data is here
    sent: dict = {}                                    # (kind, to rank, chunk at receiver, mb) -> time
    timeline = Timeline([[] for _ in range(n)])

    def blocked(rank: int, a: Action) -> str | None:
        """Why `a` cannot run now on `rank` (None: it can)."""
        for kind, c, m in _halves(a):
            if kind == "F" and not s.is_first(rank, c, m) and ("F", c, m) not in arrived[rank]:
                return f"its input activation was not received or produced (no RECV_F{c}.{m} before it)"
            if kind in ("B", "BW"):
                if ("F", c, m) not in done[rank]:
                    return f"F{c}.{m} has not run on this rank"
                if not s.is_last(rank, c, m) and ("B", c, m) not in arrived[rank]:
                    return f"its output gradient was not received or produced (no RECV_B{c}.{m} before it)"
            if kind == "W" and ("B", c, m) not in done[rank]:
                return f"B{c}.{m} has not run on this rank"
        if a.kind.startswith("SEND"):
            need = ("F" if a.kind == "SEND_F" else "B", a.chunk, a.mb)
            if need not in done[rank]:
                return f"{need[0]}{a.chunk}.{a.mb} has not run on this rank"
        if a.kind.startswith("RECV") and (a.kind[-1], rank, a.chunk, a.mb) not in sent:
            return "waiting for its send"
        return None

    def run(rank: int, a: Action) -> None:
        start = clock[rank]
        for kind, c, m in _halves(a):
            if kind == "W":
                start = max(start, done[rank][("B", c, m)])
        if a.kind.startswith("RECV"):
            start = max(start, sent[(a.kind[-1], rank, a.chunk, a.mb)] + times.comm)
        end = start + times.of(a.kind)
        clock[rank] = end
        timeline.spans[rank].append((a, start, end))
        for kind, c, m in _halves(a):
            if kind == "F":
                done[rank][("F", c, m)] = end
                hop = s.next_hop(rank, c, m)
                if hop is not None and hop[0] == rank:
                    arrived[rank][("F", hop[1], m)] = end
            if kind in ("B", "BW"):
                done[rank][("B", c, m)] = end
                hop = s.prev_hop(rank, c, m)
                if hop is not None and hop[0] == rank:
                    arrived[rank][("B", hop[1], m)] = end
            if kind in ("W", "BW"):
                done[rank][("W", c, m)] = end
        if a.kind.startswith("SEND"):
            peer = _peer(s, rank, a)
            sent[(a.kind[-1], peer[0], peer[1], a.mb)] = end
        if a.kind.startswith("RECV"):
            arrived[rank][(a.kind[-1], a.chunk, a.mb)] = end

    while any(pos[r] < len(s.actions[r]) for r in range(n)):
        progressed = False
        for rank in range(n):
            while pos[rank] < len(s.actions[rank]):
                a = s.actions[rank][pos[rank]]
                reason = blocked(rank, a)
                if reason is not None:
                    if not a.kind.startswith("RECV"):
                        raise ScheduleError(f"rank {rank}: action {pos[rank]} ({a}) cannot run: {reason}")
                    break
                run(rank, a)
                pos[rank] += 1
                progressed = True
        if not progressed:
            waits = "; ".join(f"rank {r} waits at {s.actions[r][pos[r]]}" for r in range(n) if pos[r] < len(s.actions[r]))
            raise ScheduleError(f"deadlock: {waits}")
    return timeline
