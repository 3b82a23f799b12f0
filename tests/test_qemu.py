"""Runs on an emulated Cortex-M4 (``convc/qemu.py``): the exported harness,
built for QEMU's Arm MPS2 AN386 board with the board support convc writes,
passes under ``qemu-system-arm`` for LeNet (float and int8) and a training
step (export_c(train=True)); a wrong expected value fails the run, a hang is cut by the timeout, a
fault ends the run with its name, and the per-call counts are instructions
(a loop of a known length).

These tests skip when qemu-system-arm, arm-none-eabi-gcc or newlib is
missing, unless CONVC_REQUIRE_QEMU=1 (set by .ci/run), which turns the skip
into a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from convc.cli import main as cli_main
from convc.errors import ConvcError
from convc.export import export_c
from convc.models import lenet5
from convc.qemu import BOARDS, QemuError, QemuTimeout, missing_tools, run, write_board

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def need_qemu():
    missing = missing_tools()
    if not missing:
        return
    if os.environ.get("CONVC_REQUIRE_QEMU") == "1":
        pytest.fail(f"CONVC_REQUIRE_QEMU=1 but {', '.join(missing)} missing")
    pytest.skip(f"{', '.join(missing)} missing (.ci/run installs them and sets CONVC_REQUIRE_QEMU=1)")


def cli(argv, capsys) -> str:
    assert cli_main(argv) == 0
    return capsys.readouterr().out


def counts(out: str, entry: str) -> list[int]:
    """``entry``'s row of --run-qemu's table: calls, min, median, max instructions."""
    m = re.search(rf"^{entry}\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
    assert m, out
    return [int(m.group(i).replace(",", "")) for i in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def lenet_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qemu-lenet")


def test_lenet_float_runs_on_the_board(lenet_dir, capsys):
    """convc export lenet5 --run-qemu: the harness passes on the emulated
    board (both vectors through both entry points), and the two runs of
    the same network take the same number of instructions."""
    out = cli(["export", "lenet5", "-o", str(lenet_dir), "--name", "lenet", "--run-qemu"], capsys)
    assert "the harness printed OK" in out and "EMULATED, INDICATIVE" in out, out
    calls, low, _, high = counts(out, "lenet_run")
    assert calls == 2 and low == high and 1e6 < low < 1e8, out
    print(out)
    for f in ("board_startup.c", "board_count.S", "board.ld", "Makefile", "lenet_mps2_an386.elf"):
        assert (lenet_dir / f).exists(), f
    # the harness's own verdict, read again through the Python API (nothing rebuilt but the link)
    res = run(lenet_dir, name="lenet")
    assert float(re.search(r"^max_error (\S+)$", res.output, re.M).group(1)) <= TOLERANCE
    assert len(re.findall(r"^vector \d, lenet_run(_with_arena)?: max error", res.output, re.M)) == 4
    assert res.instructions("lenet_run") == [low, low]
    assert 0 < res.stack_bytes < 64 * 1024 and res.heap_bytes > 0


def test_wrong_expected_value_fails(lenet_dir, tmp_path):
    """The board run is a real check: the same harness with one expected
    output changed exits 1 with FAIL, and run() raises naming it."""
    for f in lenet_dir.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    harness = tmp_path / "lenet_test.c"
    text = harness.read_text()
    first = re.search(r"static const float want_\w+\[TESTS\]\[\w+\] = \{.*\n    \{\n        (\S+?),", text)
    assert first, text[:3000]
    harness.write_text(text[:first.start(1)] + "123.0f" + text[first.end(1):])
    with pytest.raises(QemuError, match=r"exited with status 1, expected 0 \(the harness failed\)") as e:
        run(tmp_path, name="lenet")
    assert "FAIL" in str(e.value) and "vector 0" in str(e.value)
    res = run(tmp_path, name="lenet", check=False)
    assert res.status == 1 and "FAIL" in res.output


def test_lenet_int8_runs_on_the_board(tmp_path):
    """convc export --int8's library and harness pass on the board, exactly."""
    exp = export_c(lenet5(), tmp_path, name="qlenet", int8=True)
    assert exp.graph is not None
    res = run(tmp_path, name="qlenet")
    # its oracle is the quantized graph, which the library matches bit for bit (float output dequantized)
    assert re.search(r"^max_error 0\.0+e\+00$", res.output, re.M), res.output
    n = res.instructions("qlenet_run")
    assert len(n) == 2 and min(n) > 1e6, res.table()
    print(res.table())


def test_training_steps_run_on_the_board(tmp_path):
    """A few training steps of LeNet (export_c(train=True)) pass their
    harness on the board: every step's loss, the params after the steps,
    predict and the checkpoint round trip, against the reference."""
    export_c(lenet5(), tmp_path, name="tlenet", train=True)
    res = run(tmp_path, name="tlenet", timeout=120)
    assert re.search(r"^step 2: loss ", res.output, re.M) and "checkpoint round trip: ok" in res.output, res.output
    steps = [n for n in res.instructions("tlenet_train_step") if n > 1e6]     # rejected batches return at once
    assert len(steps) >= 3 and max(res.instructions("tlenet_predict")) > 1e6, res.table()
    print(res.table())


def small_library(path, body: str, harness: str):
    """A one-function library ``tiny`` (``int tiny_run(unsigned n)``) and its
    harness, to drive the board support with code of a known behaviour."""
    path.mkdir(exist_ok=True)
    (path / "tiny.h").write_text("int tiny_run(unsigned n);\n")
    (path / "tiny.c").write_text(f'#include "tiny.h"\n\nint tiny_run(unsigned n)\n{{\n{body}\n}}\n')
    (path / "tiny_test.c").write_text(f'#include <stdio.h>\n#include "tiny.h"\n\nint main(void)\n{{\n{harness}\n}}\n')
    return path


def test_counts_are_instructions(tmp_path):
    """A loop of two instructions run n times counts 2n instructions (within
    one timer tick of the trampolines' own): the timer under -icount
    shift=0 measures instructions."""
    lib = small_library(tmp_path, '    __asm__ volatile("1: subs %0, %0, #1\\n\\tbne 1b" : "+r"(n));\n'
                                  '    return (int)n;',
                        '    if (tiny_run(1000u) || tiny_run(200000u) || tiny_run(3000000u))\n'
                        '        return 1;\n    printf("OK\\n");\n    return 0;')
    res = run(lib, name="tiny")
    tick = BOARDS["mps2-an386"].instructions(1)
    assert [c.entry for c in res.calls] == ["tiny_run"] * 3
    for n, got in zip((1000, 200000, 3000000), res.instructions("tiny_run")):
        assert abs(got - 2 * n) <= 2 * tick, (n, got)


def test_a_hang_is_cut_by_the_timeout(tmp_path):
    lib = small_library(tmp_path, "    for (;;)\n        n += *(volatile unsigned *)&n;",
                        '    printf("started\\n");\n    return tiny_run(1u);')
    with pytest.raises(QemuTimeout, match=r"did not end within 2 s and was killed") as e:
        run(lib, name="tiny", timeout=2)
    assert "started" in str(e.value)             # what it printed before the hang


def test_a_fault_ends_the_run_with_its_name(tmp_path):
    """A read from an address with no memory is a fault: the run ends at
    once with the fault's name instead of hanging until the timeout."""
    lib = small_library(tmp_path, "    return (int)*(volatile unsigned *)(0xF0000000u + n);",
                        "    return tiny_run(0u);")
    with pytest.raises(QemuError, match=r"(HardFault|BusFault) exception"):
        run(lib, name="tiny", timeout=20)


def test_the_makefile_builds_and_runs_the_same_program(tmp_path):
    """The Makefile write_board emits holds build()'s command lines: `make
    run` from a clean directory builds the program and QEMU runs it."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    lib = small_library(tmp_path, "    return (int)n - 7;", '    printf(tiny_run(7u) ? "FAIL\\n" : "OK\\n");\n    return 0;')
    write_board(lib, "tiny")
    proc = subprocess.run(["make", "run"], cwd=lib, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK\n@convc call tiny_run ticks " in proc.stdout and "@convc exit 0" in proc.stdout, proc.stdout
    assert (lib / "tiny_mps2_an386.elf").exists()


def test_board_files_without_a_run(tmp_path, capsys):
    """--board alone writes the board support and a Makefile beside the
    library; unknown boards and a missing library are clear errors."""
    out = cli(["export", "lenet5", "-o", str(tmp_path), "--name", "lenet", "--board", "mps2-an386"], capsys)
    assert "make -C" in out
    make = (tmp_path / "Makefile").read_text()
    assert "-Wl,--wrap=lenet_run " in make and "-semihosting-config enable=on,target=native" in make
    assert "ORIGIN = 0x20000000" in (tmp_path / "board.ld").read_text()
    with pytest.raises(ConvcError, match="board 'nope': convc knows mps2-an386"):
        run(tmp_path, name="lenet", board="nope")
    with pytest.raises(ConvcError, match=r"other\.c: no such file; export the library"):
        run(tmp_path, name="other")
