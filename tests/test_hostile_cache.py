"""Hostile states of the compile cache and hostile model files for the CLI
(convc issue 16, items 3, 4, 7 and the cache parts of 11). Every test points
CONVC_CACHE_DIR at its own tmp directory. The tests run as root here, so the
kernel would let this process read anything: they check convc's own
ownership and permission logic (files chowned to another uid, modes set
explicitly), not the kernel's."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.cli import main as cli_main
from convc.errors import CompileError, ConvcError
from convc.export import load_model
from convc.runtime import cache
from helpers import TARGETS, assert_close, chain_graph, subprocess_env

OTHER_UID = 54321            # a uid that is not ours (we may be root; any other uid is "someone else")


def torch_chain(feeds, weights):
    h = torch.from_numpy(feeds["x"].astype(np.float64))
    for w, b in weights:
        h = F.conv2d(h, torch.from_numpy(w.astype(np.float64)), torch.from_numpy(b.astype(np.float64)), padding=1)
    return h.numpy()


def entries(root: Path):
    return sorted(root.glob("*/*/module.so"))


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def compile_checked(name, seed=1, depth=1, what=""):
    """Compile chain_graph(name) for C, check it against torch, return the module."""
    g, feeds, weights = chain_graph(name, seed=seed, depth=depth)
    mod = cc.compile(g, target="c")
    assert_close(mod.run(feeds)["y"], torch_chain(feeds, weights), what=what or name)
    return mod


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");       /* proves the planted code ran */
    if (f) { fputs("planted constructor ran\n", f); fclose(f); }
}
"""


def planted_library(tmp_path: Path) -> tuple[bytes, Path]:
    """A shared library whose constructor creates a marker file: its bytes
    and the marker's path."""
    marker = tmp_path / "PLANTED_RAN"
    src, so = tmp_path / "planted.c", tmp_path / "planted.so"
    src.write_text(PLANTED)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(so), str(src)], check=True)
    return so.read_bytes(), marker


def plant(lib: Path, data: bytes) -> None:
    """Replace ``lib`` with ``data`` and make its manifest match it (what
    someone who can write the entry would do)."""
    lib.unlink()
    lib.write_bytes(data)
    man = lib.parent / "manifest.json"
    meta = json.loads(man.read_text())
    meta["sha256"] = cache.sha256_file(lib)
    man.write_text(json.dumps(meta))


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "cache"
    monkeypatch.setenv("CONVC_CACHE_DIR", str(r))
    return r


# -- item 3: the cache trusts nobody ------------------------------------------------------------

@pytest.mark.parametrize("target", [t for t in TARGETS if t != "numpy"])
def test_item3_cache_is_private_whatever_the_umask(root, target):
    """Issue 16 item 3: under umask 0 the root, shards, entries are 0700 and
    the files convc writes 0600 (libraries 0700), on every compiled target."""
    old = os.umask(0)
    try:
        g, feeds, weights = chain_graph(f"umask0_{target}", seed=2, depth=1)
        mod = cc.compile(g, target=target)
    finally:
        os.umask(old)
    assert_close(mod.run(feeds)["y"], torch_chain(feeds, weights), what=f"{target} under umask 0")
    (lib,) = entries(root)
    for d in (root, lib.parent.parent, lib.parent):
        assert mode(d) == 0o700, f"{d} has mode {oct(mode(d))}"
    for f in lib.parent.iterdir():
        assert mode(f) & 0o077 == 0, f"{f} is readable or writable by others: {oct(mode(f))}"
    assert (root / cache.MARKER).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")


@pytest.mark.parametrize("how", ["world_writable", "group_writable", "foreign_owner", "parent_world_writable",
                                 "symlink_to_foreign"])
def test_item3_untrusted_root_is_bypassed(tmp_path, monkeypatch, how):
    """Issue 16 item 3: a cache root writable by others, owned by someone
    else, below a non-sticky world-writable directory, or a symbolic link to
    a foreign directory is not used (not read, not written): a CacheWarning,
    and the module is built in a private temporary directory and is right."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    link = None
    if how == "world_writable":
        root.chmod(0o777)
    elif how == "group_writable":
        root.chmod(0o770)
    elif how == "foreign_owner":
        os.chown(root, OTHER_UID, OTHER_UID)
    elif how == "parent_world_writable":
        tmp_path.chmod(0o777)
    elif how == "symlink_to_foreign":
        os.chown(root, OTHER_UID, -1)
        link = tmp_path / "link"
        link.symlink_to(root)
    monkeypatch.setenv("CONVC_CACHE_DIR", str(link or root))
    before = sorted(p.name for p in root.iterdir())
    with pytest.warns(cache.CacheWarning, match="is not used"):
        mod = compile_checked(f"root_{how}", seed=3)
    assert not Path(mod.library_path).resolve().is_relative_to(root.resolve())
    assert sorted(p.name for p in root.iterdir()) == before, "the untrusted root was written"
    tmp_path.chmod(0o700)


@pytest.mark.parametrize("how", ["entry_foreign", "shard_foreign", "lib_foreign", "entry_world_writable",
                                 "lib_world_writable", "entry_symlink", "lib_symlink"])
def test_item3_planted_library_does_not_run(root, tmp_path, how):
    """Issue 16 item 3: a planted module.so with a matching manifest, in an
    entry that someone else owns or can write (or reached through a symbolic
    link), is never dlopened: its constructor does not run; convc warns and
    builds the module privately."""
    mod = compile_checked(f"planted_{how}", seed=4)
    lib = Path(mod.library_path)
    entry = lib.parent
    data, marker = planted_library(tmp_path)
    if how == "entry_symlink":        # the entry is a link to a directory holding the planted library
        elsewhere = tmp_path / "elsewhere"
        entry.rename(elsewhere)
        plant(elsewhere / "module.so", data)
        os.chown(elsewhere, OTHER_UID, -1)
        entry.symlink_to(elsewhere)
    elif how == "lib_symlink":
        evil = tmp_path / "evil.so"
        evil.write_bytes(data)
        plant(lib, data)
        lib.unlink()
        lib.symlink_to(evil)
    else:
        plant(lib, data)
        target = {"entry_foreign": entry, "shard_foreign": entry.parent, "lib_foreign": lib,
                  "entry_world_writable": entry, "lib_world_writable": lib}[how]
        if "foreign" in how:
            os.chown(target, OTHER_UID, OTHER_UID)
        else:
            target.chmod(0o777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            again, failed = compile_checked(f"planted_{how}", seed=4, what=f"after planting ({how})"), None
        except Exception as e:      # noqa: BLE001  (the marker is checked first)
            failed = e
    assert not marker.exists(), "the planted library's constructor ran"
    if failed:
        raise failed
    if how.startswith("lib_"):   # a bad file inside our own private entry: not loaded, the entry is rebuilt
        assert Path(again.library_path) == lib and not lib.is_symlink() and mode(lib) == 0o700
        assert os.lstat(lib).st_uid == os.geteuid()
    else:                        # an entry someone else controls: not used at all
        assert any(issubclass(w.category, cache.CacheWarning) for w in caught), [str(w.message) for w in caught]
        assert not Path(again.library_path).is_relative_to(root)


def test_item3_bytes_checked_are_bytes_loaded(root, tmp_path, monkeypatch):
    """Issue 16 item 3: the library is swapped after the cache check and
    before the load (the race): the planted bytes do not match the manifest
    and are not loaded; a clear CompileError, nothing runs."""
    compile_checked("race_swap", seed=5)
    data, marker = planted_library(tmp_path)
    real_lookup = cache.lookup

    def lookup_then_swap(*a, **kw):
        hit = real_lookup(*a, **kw)
        if hit is not None:                  # the check passed: now the file changes under us
            hit.unlink()
            hit.write_bytes(data)
            hit.chmod(0o700)
        return hit

    monkeypatch.setattr(cache, "lookup", lookup_then_swap)
    g, _, _ = chain_graph("race_swap", seed=5, depth=1)
    try:
        cc.compile(g, target="c")
        failed = None
    except Exception as e:          # noqa: BLE001  (the marker is checked first)
        failed = e
    assert not marker.exists(), "the swapped-in library's constructor ran"
    assert isinstance(failed, CompileError) and "does not match its manifest" in str(failed), repr(failed)
    monkeypatch.setattr(cache, "lookup", real_lookup)
    compile_checked("race_swap", seed=5, what="rebuilt after the swap")
    assert not marker.exists()


def test_item3_tuning_database_not_private_is_ignored(root):
    """Issue 16 item 3: a tuning database someone else could have written
    (world-writable, or owned by another uid) is ignored with a warning."""
    from convc import tuning

    host = tuning.probe()
    path = tuning.db_path(host)
    assert mode(path.parent) == 0o700
    db = tuning.Database(host, path)
    db.put(tuning.entry_key("some signature", 1), {"algorithm": "direct", "threads": 1})
    db.save()
    assert mode(path) == 0o600
    assert tuning.Database.load(host).entries, "our own database must load"
    for change in (lambda: path.chmod(0o666), lambda: os.chown(path, OTHER_UID, -1)):
        change()
        with pytest.warns(tuning.TuningWarning, match="is ignored"):
            assert not tuning.Database.load(host).entries
        os.chown(path, os.geteuid(), -1)
        path.chmod(0o600)


# -- item 4: convc cache --clear deletes only convc's own entries ----------------------------------

def test_item4_clear_deletes_only_convc_entries(root, tmp_path, capsys):
    """Issue 16 item 4: with CONVC_CACHE_DIR holding unrelated files (a
    project dir, $HOME), `convc cache --clear` removes convc's entries and
    nothing else, follows no symbolic link, and lists what it left."""
    mod = compile_checked("clear_me", seed=7)
    entry = Path(mod.library_path).parent
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    unrelated = {
        "notes.txt": "file", "src/main.c": "file", "ab/readme": "file",        # a 2-hex dir that is not ours
        "cd/" + "c" * 64 + "/data.bin": "file",                                  # key-like dir, wrong shard
        entry.parent.name + "/" + "0" * 64 + "/sub/x": "file",                   # key-like dir with a subdir
    }
    for rel in unrelated:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("mine")
    (root / "link").symlink_to(outside)
    (root / "tuning").mkdir(exist_ok=True)
    (root / "tuning" / "host.json").write_text("{}")
    assert cli_main(["cache", "--clear"]) == 0
    out = capsys.readouterr().out
    assert not entry.exists(), "convc's entry was not removed"
    for rel in unrelated:
        assert (root / rel).read_text() == "mine", f"{rel} was deleted"
    assert (outside / "precious.txt").read_text() == "keep" and (root / "link").is_symlink()
    assert (root / "tuning" / "host.json").exists()
    assert "left" in out and "notes.txt" in out and "link" in out
    # and the cache still works after the clear
    compile_checked("clear_me", seed=7, what="after clear")


def test_item4_clear_skips_an_entry_a_build_holds(root):
    """Issue 16 item 4: --clear does not pull an entry from under a build in
    progress (it holds the entry's lock): that entry is left and reported,
    the others go."""
    busy = Path(compile_checked("clear_busy", seed=13).library_path).parent
    idle = Path(compile_checked("clear_idle", seed=14).library_path).parent
    with cache.locked(busy):
        removed, left = cache.clear(root)
    assert busy in left and (busy / "module.so").exists()
    assert idle in removed and not idle.exists()


def test_item4_clear_on_home_like_dir_deletes_nothing(tmp_path, monkeypatch, capsys):
    """Issue 16 item 4: CONVC_CACHE_DIR mis-set to a directory that was never
    a convc cache: --clear deletes nothing there."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for rel in ("Documents/a.txt", ".bashrc", "ff/deadbeef", "probes/keep.so"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("x")
    monkeypatch.setenv("CONVC_CACHE_DIR", str(home))
    entry = Path(compile_checked("home_clear", seed=11).library_path).parent     # convc's own entry there
    assert not (home / cache.MARKER).exists(), "a directory holding other things must not be tagged"
    assert cli_main(["cache", "--clear"]) == 0
    assert not entry.exists()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) == \
        [".bashrc", "Documents/a.txt", "ff/deadbeef", "probes/keep.so"]
    assert "left" in capsys.readouterr().out


def test_item4_cache_command_on_untrusted_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Issue 16 item 4: `convc cache --clear` on a root someone else can
    write refuses (exit 2, a message naming the rule) and touches nothing."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    (root / "file").write_text("x")
    monkeypatch.setenv("CONVC_CACHE_DIR", str(root))
    assert cli_main(["cache", "--clear"]) == 2
    assert "writable by group or others" in capsys.readouterr().err
    assert (root / "file").exists()


# -- item 7: only .py files run as Python -------------------------------------------------------

MODEL_SOURCE = """
import convc as cc
open({marker!r}, "w").write("ran")
def build():
    g = cc.Graph("m")
    x = g.input("x", (1, 1, 4, 4))
    g.output(cc.relu(x), "y")
    return g
"""


def hostile_model_files(tmp_path: Path) -> tuple[list[Path], Path]:
    marker = tmp_path / "MODEL_RAN"
    src = MODEL_SOURCE.format(marker=str(marker))
    files = []
    for name in ("model.pb", "weights.npy", "model.onnx.bak", "model"):
        (tmp_path / name).write_text(src)
        files.append(tmp_path / name)
    for name in ("model.zip", "archive.py"):           # a zip with __main__.py, also one named .py
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("__main__.py", src)
        files.append(tmp_path / name)
    pkg = tmp_path / "pkgdir.py"                        # a directory with __main__.py, named .py
    pkg.mkdir()
    (pkg / "__main__.py").write_text(src)
    files.append(pkg)
    return files, marker


def test_item7_data_files_are_not_run_as_python(tmp_path, monkeypatch, capsys):
    """Issue 16 item 7: .pb, .npy, .onnx.bak, an extension-less file, a zip
    with __main__.py (also one named .py) and a directory named .py are a
    ConvcError listing what is accepted, from load_model and from every CLI
    command that takes a model; none of them runs."""
    monkeypatch.chdir(tmp_path)
    files, marker = hostile_model_files(tmp_path)
    for f in files:
        with pytest.raises(ConvcError, match=r"\*\.py") as e:
            load_model(str(f))
        assert "lenet5" in str(e.value) and ".onnx" in str(e.value), str(e.value)
        for argv in (["compile", str(f)], ["run", str(f)], ["export", str(f), "--size"], ["passes", str(f)],
                     ["tune", str(f), "--budget", "1", "--quiet"]):
            assert cli_main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "convc: error: model" in err and "*.py" in err, (argv, err)
    assert not marker.exists(), "a data file was executed as Python"
    # control: the same source in a .py file does run (the test's marker works)
    ok = tmp_path / "model.py"
    ok.write_text(MODEL_SOURCE.format(marker=str(marker)))
    assert load_model(str(ok)).input_names == ["x"]
    assert marker.exists()


# -- item 11 (cache parts): unusable roots, killed builds, hostile entries --------------------------

@pytest.mark.parametrize("how", ["is_a_file", "parent_is_a_file", "read_only_filesystem"])
def test_item11_unusable_cache_dir_falls_back_with_warning(tmp_path, monkeypatch, how):
    """Issue 16 item 11: a CONVC_CACHE_DIR that is a file, cannot be created
    or is read-only: a CacheWarning naming the reason and a private temporary
    cache for this process (compiling still works), never a bare OSError."""
    if how == "is_a_file":
        root = tmp_path / "cachefile"
        root.write_text("not a dir")
        reason = "not a directory"
    elif how == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        root = tmp_path / "file" / "cache"
        reason = "cannot be created"
    else:
        root = Path("/proc/convc-cache")        # a filesystem nobody can create directories on
        reason = "cannot be created"
    monkeypatch.setenv("CONVC_CACHE_DIR", str(root))
    with pytest.warns(cache.CacheWarning, match=reason):
        mod = compile_checked(f"unusable_{how}", seed=8)
    assert not Path(mod.library_path).is_relative_to(root)
    assert cli_main(["cache"]) in (0, 2)          # reports, never raises


def test_item11_cache_command_on_a_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Issue 16 item 11: `convc cache` with CONVC_CACHE_DIR a file: exit 2
    and a message, not a traceback."""
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("CONVC_CACHE_DIR", str(f))
    assert cli_main(["cache", "--clear"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert f.read_text() == "x"


@pytest.mark.parametrize("state", ["manifest_is_a_list", "manifest_is_a_dir", "manifest_binary",
                                   "manifest_sha_not_str", "lib_is_a_dir", "lib_missing", "manifest_symlink"])
def test_item11_hostile_entry_states_rebuild(root, tmp_path, state):
    """Issue 16 item 11: hostile states of our own entry (manifest JSON that
    is not an object, a directory, binary, a non-string hash, a symbolic
    link; module.so a directory or missing) rebuild the entry instead of
    raising a bare exception."""
    lib = Path(compile_checked(f"state_{state}", seed=9).library_path)
    man = lib.parent / "manifest.json"
    if state == "manifest_is_a_list":
        man.write_text("[1, 2]")
    elif state == "manifest_is_a_dir":
        man.unlink()
        man.mkdir()
        (man / "x").write_text("x")
    elif state == "manifest_binary":
        man.write_bytes(b"\xff\xfe\x00garbage")
    elif state == "manifest_sha_not_str":
        man.write_text(json.dumps({"sha256": 12345}))
    elif state == "lib_is_a_dir":
        lib.unlink()
        lib.mkdir()
        (lib / "x").write_text("x")
    elif state == "lib_missing":
        lib.unlink()
    elif state == "manifest_symlink":
        other = tmp_path / "manifest.json"
        other.write_text(man.read_text())
        man.unlink()
        man.symlink_to(other)
    s0 = dict(cache.STATS)
    again = compile_checked(f"state_{state}", seed=9, what=f"after {state}")
    assert cache.STATS["compiles"] == s0["compiles"] + 1
    assert Path(again.library_path) == lib and lib.is_file() and man.is_file() and not man.is_symlink()
    assert json.loads(man.read_text())["sha256"] == cache.sha256_file(lib)


KILLED_CHILD = r"""
import sys
import convc as cc
from helpers import chain_graph
g, _, _ = chain_graph("killed_build", 10, 14)
print("compiling", flush=True)
cc.compile(g, target="c")
print("finished", flush=True)
"""


def test_item11_kill_9_during_compile_leaves_no_temp_file(root, tmp_path, monkeypatch):
    """Issue 16 item 11: a build killed by SIGKILL while gcc runs leaves its
    temporary .so in the entry; the next build of that entry removes it
    (under the entry's lock, so a live concurrent build is never touched).

    The compiler is a wrapper around gcc that, while a flag file exists,
    stalls instead of compiling an entry's module.c: the kill lands while "gcc runs" however fast
    the machine is (a real gcc could finish first), and with the flag gone the
    same wrapper (same command line, same version banner, so the same cache
    entry) builds for real."""
    flag, started = tmp_path / "stall", tmp_path / "started"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" --version "*) exec gcc "$@";; esac
case " $* " in *" {root}/"??/*/module.c" "*)     # a cache entry's build (not the thread probe's)
    if [ -e "{flag}" ]; then touch "{started}"; exec sleep 300; fi;;
esac
exec gcc "$@"
""")
    wrapper.chmod(0o755)
    flag.touch()
    monkeypatch.setenv("CONVC_CC", str(wrapper))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD], env=subprocess_env(CONVC_CACHE_DIR=root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, temps = time.time() + 120, []
        while time.time() < deadline and proc.poll() is None:
            temps = [p for p in root.glob("*/*/*.so") if p.name != "module.so" and not p.name.startswith(".load")]
            if temps and started.exists():
                break
            time.sleep(0.01)
        assert temps and started.exists(), \
            f"the compile did not start (child: {proc.poll()}, {proc.stderr.read() if proc.poll() is not None else ''})"
        os.killpg(proc.pid, signal.SIGKILL)                 # the child and its "gcc"
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (temp,) = temps
    assert temp.exists() and not (temp.parent / "module.so").exists()
    flag.unlink()
    compile_checked("killed_build", seed=10, depth=14, what="after the killed build")
    left = sorted(p.name for p in temp.parent.iterdir())
    assert left == [".lock", "manifest.json", "module.c", "module.so"], left


def test_item11_private_copy_left_by_a_killed_load_is_removed(root):
    """Issue 16 item 11: a process killed between copying a library out of
    the cache and loading it leaves a `.load-PID-...so`; the next load of that
    entry removes it once its process is gone and it is old, and keeps a copy
    whose process still lives."""
    entry = Path(compile_checked("stale_load", seed=12).library_path).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = entry / f".load-{int(dead.stdout)}-1-deadbeef.so"
    alive = entry / f".load-{os.getppid()}-1-cafef00d.so"
    for f in (stale, alive):
        f.write_bytes(b"x")
        old = time.time() - 10 * cache.STALE_LOAD_SECONDS
        os.utime(f, (old, old))
    compile_checked("stale_load", seed=12, what="cache hit")
    assert not stale.exists(), "the copy left by a dead process stays"
    assert alive.exists(), "a live process's copy was removed"
