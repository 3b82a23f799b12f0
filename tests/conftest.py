"""Test session setup: every compile in the session (and in child processes
the tests start) goes to a fresh, private compile cache."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):      # convc from this checkout, and tests/helpers.py
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture(scope="session", autouse=True)
def convc_cache_dir(tmp_path_factory):
    """Point CONVC_CACHE_DIR at a fresh directory for the whole session."""
    path = tmp_path_factory.mktemp("convc-cache")
    old = os.environ.get("CONVC_CACHE_DIR")
    os.environ["CONVC_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CONVC_CACHE_DIR", None)
    else:
        os.environ["CONVC_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def restore_thread_count():
    """A test that sets convc's thread count (``convc tune --threads 1`` run
    in-process, the bench's thread sweep) gives the next test in its worker
    the count it found: what a compile consults (the module cache's key, the
    tuner) must not depend on which test ran before."""
    from convc.runtime.threads import get_num_threads, set_num_threads
    n = get_num_threads()
    yield
    if get_num_threads() != n:
        set_num_threads(n)
