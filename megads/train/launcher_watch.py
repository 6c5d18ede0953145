"""A rank ends when its launcher does.

torchrun starts every rank as a child of its agent (launch/run.py runs torchrun in its own
process). If that process is killed outright (SIGKILL, OOM killer), nothing is left to stop the
ranks: they would train on unsupervised, writing checkpoints and metrics that a restarted job
then races with. Each rank started by torchrun therefore watches its parent and exits as soon
as it is gone (the rank is then a child of init or a subreaper). A rank run directly with
`python -m megads.pretrain` is not watched: there the parent is a shell, which may end first.
"""
from __future__ import annotations

import os
import sys
import threading
import time

POLL_SECONDS = 0.5


def exit_with_launcher() -> None:
    """Under torchrun, start a daemon thread that ends this process once its parent is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        print(f"megads: rank {os.environ.get('RANK', '?')}: its launcher (pid {parent}) is gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="megads-launcher-watch", daemon=True).start()
