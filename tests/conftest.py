import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)   # configs/ and tools/ are addressed relative to the repository root


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One synthetic corpus + tokenizer build shared by every test that trains."""
    return str(tmp_path_factory.mktemp("megads_cache"))


@dataclass
class DemoRun:
    run_dir: str                 # runs/tiny of the README's demo
    cache_dir: str               # its corpus and tokenizer, built from nothing by the demo
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The README's demo command, run once: 4 ranks (DP=2 x TP=2, EP=2) through the launcher, from
    an empty data cache. tests/test_train.py checks what it printed and learned, tests/test_demo_output.py
    that it printed nothing but megads' own lines; the GRPO tests start from its checkpoint, as a user
    following the README does."""
    root = tmp_path_factory.mktemp("demo")
    run_dir, cache_dir = str(root / "tiny"), str(root / "cache")
    proc = subprocess.run([sys.executable, "launch/run.py", "--nproc-per-node", "4", "pretrain", "configs/tiny.yaml",
                           "parallel.ep=2", f"train.run_dir={run_dir}", f"data.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=900)
    return DemoRun(run_dir, cache_dir, proc)
