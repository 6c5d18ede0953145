#!/usr/bin/env python3
"""The one launcher megads uses: `python launch/run.py [--nproc-per-node N] MODULE CONFIG [overrides]`.

It runs `torchrun --standalone --nproc-per-node N -m megads.MODULE ...` (MODULE: pretrain, ...).
With N = 1 it still goes through torchrun, so the single-process path is the one users launch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


def torchrun_command(module: str, args: list[str], nproc_per_node: int) -> list[str]:
    torchrun = shutil.which("torchrun")
    prefix = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return prefix + ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", f"megads.{module}", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("module", help="megads entry point: pretrain")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="config path and section.key=value overrides")
    opts = parser.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc_per_node)))
    return subprocess.call(torchrun_command(opts.module, opts.args, opts.nproc_per_node), env=env)


if __name__ == "__main__":
    sys.exit(main())
