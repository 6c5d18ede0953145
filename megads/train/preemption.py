"""Stop training cleanly when the scheduler asks, so that a requeued job resumes where it stopped.

Slurm sends SIGUSR1 ahead of the time limit (`sbatch --signal=USR1@600`) and SIGTERM when it
preempts or cancels a job (launch/run.py forwards a SIGTERM it gets to the ranks). The handler
only records the signal. After every optimizer step the trainer (pretraining, SFT, GRPO) asks
`stop_agreed()`: one all-reduce makes every rank stop after the same step even when the signal
reached them during different steps. The trainer then saves a checkpoint and the entry point
exits with REQUEUE_EXIT_CODE (`requeue()`), which the launcher and slurm/*.sh turn into
`scontrol requeue`; the requeued job resumes from that checkpoint (checkpoint.resume=auto).
"""
from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75          # EX_TEMPFAIL of sysexits.h: stopped early, run me again
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionSignals:
    """Record SIGUSR1 / SIGTERM while the block runs; restore the previous handlers after it.

        with PreemptionSignals() as preemption:
            trainer.fit(preemption)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "PreemptionSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)

    @property
    def reason(self) -> str:
        return self.received.name if self.received is not None else "another rank's preemption signal"

    def stop_agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a signal (a collective: call it on all ranks)."""
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self, steps: int, rank: int) -> int:
        """The entry point's exit status once the trainer stopped after step `steps` and saved."""
        if rank == 0:
            print(f"megads: stopped at step {steps} on {self.reason}, checkpoint saved; "
                  f"exit status {REQUEUE_EXIT_CODE} asks the launcher to requeue (the rerun resumes from it)")
        return REQUEUE_EXIT_CODE
