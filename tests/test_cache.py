"""The compile cache: hits skip the compiler (in this process and in others),
corrupt entries are rebuilt, concurrent builds of one module are safe, and
CONVC_CACHE_DIR decides where entries live."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import convc.runtime.build
from convc.runtime import cache
from helpers import assert_close, chain_graph, child_args, subprocess_env

TIMEOUT = 120


def torch_chain(feeds, weights):
    h = torch.from_numpy(feeds["x"].astype(np.float64))
    for w, b in weights:
        h = F.conv2d(h, torch.from_numpy(w.astype(np.float64)), torch.from_numpy(b.astype(np.float64)), padding=1)
    return h.numpy()


def run_child(name, seed, depth, out, **env):
    proc = subprocess.run(child_args(name, seed, depth, out), capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=TIMEOUT)
    assert proc.returncode == 0, f"child failed (exit {proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def entries(root: Path):
    return sorted(root.glob("*/*/module.so"))


class CompilerCalled(Exception):
    pass


def test_session_cache_dir_is_used(convc_cache_dir):
    assert os.environ["CONVC_CACHE_DIR"] == str(convc_cache_dir)
    g, feeds, _ = chain_graph("session_dir", seed=11, depth=1)
    mod = cc.compile(g, target="c")
    assert Path(mod.library_path).resolve().is_relative_to(Path(convc_cache_dir).resolve())


# (a) -------------------------------------------------------------------------------

def test_second_compile_in_process_does_not_call_the_compiler(monkeypatch):
    g, feeds, weights = chain_graph("cache_inproc", seed=1)
    s0 = dict(cache.STATS)
    mod1 = cc.compile(g, target="c")
    assert cache.STATS["compiles"] == s0["compiles"] + 1, "first compile of a new graph must build it"

    def boom(*a, **kw):
        raise CompilerCalled(f"subprocess.run called: {a}")

    monkeypatch.setattr(convc.runtime.build.subprocess, "run", boom)
    s1 = dict(cache.STATS)
    mod2 = cc.compile(g, target="c")
    # an identical structure built again, with other weights: same library, own params
    g3, _, weights3 = chain_graph("cache_inproc", seed=2)
    mod3 = cc.compile(g3, target="c")
    assert cache.STATS["compiles"] == s1["compiles"]
    assert cache.STATS["hits"] == s1["hits"] + 2
    assert mod2.library_path == mod1.library_path == mod3.library_path
    assert_close(mod2.run(feeds)["y"], torch_chain(feeds, weights), what="cache hit")
    assert_close(mod3.run(feeds)["y"], torch_chain(feeds, weights3), what="cache hit, other weights")
    assert_close(mod1.run(feeds)["y"], torch_chain(feeds, weights), what="first module after hits")

    # the patch really bites: a graph not in the cache does reach the compiler
    g4, _, _ = chain_graph("cache_inproc_other", seed=1)
    with pytest.raises(CompilerCalled):
        cc.compile(g4, target="c")


# (b) -------------------------------------------------------------------------------

def test_second_process_loads_from_cache(tmp_path, convc_cache_dir):
    g, feeds, weights = chain_graph("cache_xproc", seed=3)
    mod = cc.compile(g, target="c")
    here = mod.run(feeds)["y"]

    stats = run_child("cache_xproc", 3, 3, tmp_path / "child.npy")
    assert stats["compiles"] == 0, stats
    assert stats["hits"] == 1, stats
    assert stats["library"] == str(mod.library_path)
    there = np.load(tmp_path / "child.npy")
    np.testing.assert_array_equal(there, here)
    assert_close(there, torch_chain(feeds, weights), what="child process result")

    # control: a child with an empty cache directory does compile
    other = tmp_path / "other-cache"
    stats = run_child("cache_xproc", 3, 3, tmp_path / "child2.npy", CONVC_CACHE_DIR=other)
    assert stats["compiles"] == 1 and stats["hits"] == 0, stats
    assert Path(stats["library"]).is_relative_to(other)
    assert not any(Path(convc_cache_dir).glob("**/other-cache"))


# (c) -------------------------------------------------------------------------------

def _garbage(lib: Path):
    lib.write_bytes(b"\x7fNOT-AN-ELF" + bytes(range(256)) * 64)


def _flip_one_byte(lib: Path):
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))


def _empty(lib: Path):
    lib.write_bytes(b"")


def _bad_manifest(lib: Path):
    (lib.parent / "manifest.json").write_text("{ not json")


def _no_manifest(lib: Path):
    (lib.parent / "manifest.json").unlink()


@pytest.mark.parametrize("corrupt", [_garbage, _flip_one_byte, _empty, _bad_manifest, _no_manifest],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_entry_is_rebuilt(tmp_path, monkeypatch, corrupt):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("CONVC_CACHE_DIR", str(cache_root))
    # populate the entry from a child, so this process never mapped the library
    stats = run_child("cache_corrupt", 4, 2, tmp_path / "child.npy")
    assert stats["compiles"] == 1
    (lib,) = entries(cache_root)
    good = lib.read_bytes()
    corrupt(lib)

    g, feeds, weights = chain_graph("cache_corrupt", seed=4, depth=2)
    s0 = dict(cache.STATS)
    mod = cc.compile(g, target="c")
    assert cache.STATS["compiles"] == s0["compiles"] + 1, "a corrupt entry must be rebuilt"
    assert cache.STATS["rebuilt_corrupt"] > s0["rebuilt_corrupt"]
    assert Path(mod.library_path) == lib
    assert lib.read_bytes() == good, "the rebuilt library differs from the original build"
    meta = json.loads((lib.parent / "manifest.json").read_text())
    assert meta["sha256"] == cache.sha256_file(lib)
    assert_close(mod.run(feeds)["y"], torch_chain(feeds, weights), what=f"after {corrupt.__name__}")
    # and the repaired entry is a plain hit from now on
    s1 = dict(cache.STATS)
    cc.compile(g, target="c")
    assert cache.STATS["compiles"] == s1["compiles"] and cache.STATS["hits"] == s1["hits"] + 1


INPROC_CORRUPT = r"""
import sys
import convc as cc
from helpers import chain_graph
g, feeds, _ = chain_graph("inproc_corrupt", 8, 1)
mod = cc.compile(g, target="c")
before = mod.run(feeds)["y"]
mod.library_path.write_bytes(b"garbage" * 100)     # corrupt the entry this process has loaded
again = cc.compile(g, target="c").run(feeds)["y"]
assert (again == before).all()
print("survived")
"""


def test_corrupt_entry_loaded_in_this_process_is_rebuilt(tmp_path):
    # run in a child: the failure mode is a crash of the whole process
    proc = subprocess.run([sys.executable, "-c", INPROC_CORRUPT], capture_output=True, text=True,
                          env=subprocess_env(CONVC_CACHE_DIR=tmp_path / "cache"), timeout=TIMEOUT)
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"child exit {proc.returncode} (negative = killed by that signal):\n{proc.stderr[-2000:]}")


# (d) -------------------------------------------------------------------------------

@pytest.mark.parametrize("nprocs", [2, 4])
def test_concurrent_processes_build_one_module_safely(tmp_path, nprocs):
    cache_root = tmp_path / "cache"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    name, seed, depth = f"cache_race{nprocs}", 5, 12    # deep enough that the compile takes a while
    env = subprocess_env(CONVC_CACHE_DIR=cache_root, BARRIER=barrier, NPROCS=nprocs)
    procs = [subprocess.Popen(child_args(name, seed, depth, tmp_path / f"out{i}.npy"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nprocs)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, f"child failed (exit {p.returncode}):\n{err}"
        results.append(json.loads(out.strip().splitlines()[-1]))

    _, feeds, weights = chain_graph(name, seed, depth)
    want = torch_chain(feeds, weights)
    for i in range(nprocs):
        assert_close(np.load(tmp_path / f"out{i}.npy"), want, what=f"process {i}")
    assert sum(r["compiles"] for r in results) == 1, f"the lock should let exactly one build: {results}"
    assert len({r["library"] for r in results}) == 1
    (lib,) = entries(cache_root)
    meta = json.loads((lib.parent / "manifest.json").read_text())
    assert meta["sha256"] == cache.sha256_file(lib)
    leftovers = [p.name for p in lib.parent.iterdir() if p.name not in ("module.so", "module.c", "manifest.json",
                                                                       ".lock")]
    assert not leftovers, f"temporary files left in the cache entry: {leftovers}"


# (e) -------------------------------------------------------------------------------

def test_convc_cache_dir_is_honoured(tmp_path, monkeypatch, convc_cache_dir):
    root = tmp_path / "nested" / "convc-cache"          # does not exist yet
    monkeypatch.setenv("CONVC_CACHE_DIR", str(root))
    g, feeds, weights = chain_graph("cache_envdir", seed=6, depth=1)
    mod = cc.compile(g, target="c")
    (lib,) = entries(root)
    assert Path(mod.library_path) == lib
    assert (lib.parent / "manifest.json").is_file()
    assert not any(Path(convc_cache_dir).glob(f"*/{lib.parent.name}")), "entry also went to the session cache"
    assert_close(mod.run(feeds)["y"], torch_chain(feeds, weights), what="module from CONVC_CACHE_DIR")


def test_default_cache_dir_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    g, _, _ = chain_graph("cache_xdg", seed=7, depth=1)
    assert Path(cc.compile(g, target="c").library_path).is_relative_to(tmp_path / "xdg" / "convc")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(cc.compile(g, target="c").library_path).is_relative_to(tmp_path / "home" / ".cache" / "convc")
