import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)   # configs/ and tools/ are addressed relative to the repository root


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One synthetic corpus + tokenizer build shared by every test that trains."""
    return str(tmp_path_factory.mktemp("megads_cache"))
