"""Run an exported library and its harness on an emulated Cortex-M4.

``convc export MODEL -o DIR --board mps2-an386`` writes, beside the library
and its harness ``NAME_test.c``, what a bare board needs to run them
(:func:`write_board`): ``board_startup.c`` (vector table, FPU enable, .data
and .bss set-up, the newlib system calls with output and exit through Arm
semihosting), ``board_count.S`` (per-call counters around the library's entry
points), ``board.ld`` (the board's flash and RAM) and a ``Makefile``.
``--run-qemu`` also builds them with ``arm-none-eabi-gcc`` (:func:`build`)
and runs the program under ``qemu-system-arm`` with a timeout (:func:`run`),
checks that the harness passed, and reports the instructions each call of an
entry point took.

Instruction counts are EMULATED and INDICATIVE: QEMU runs with
``-icount shift=0`` (one instruction per nanosecond of virtual time) and the
board's timer, read before and after each call, measures that virtual time;
QEMU models no pipeline, cache, flash wait states or FPU latency, so a real
Cortex-M4 takes a different number of cycles.

>>> from convc.models import lenet5
>>> cc.export_c(lenet5(), "out", name="lenet")                  # doctest: +SKIP
>>> print(run("out", name="lenet").table())                     # doctest: +SKIP
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .codegen.env import environment
from .errors import CompileError, ConvcError
from .export import ARM_CC, ARM_FLAGS, run_tool

QEMU = "qemu-system-arm"
ICOUNT_SHIFT = 0        # -icount shift=N: one instruction per 2**N ns of virtual time
STACK_BYTES = 64 * 1024
MAX_CALLS = 256         # calls recorded one by one; later ones are only counted
OPT = "-O2"
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]


class QemuError(ConvcError):
    """A program run under QEMU failed: a wrong exit status, a failed
    harness, a fault, or no end within the timeout."""


class QemuTimeout(QemuError):
    """The program did not end within the timeout (a hang) and was killed."""


@dataclass(frozen=True)
class Board:
    """An emulated board: its QEMU machine, compiler flags, memory map and
    the timer the counters read."""
    name: str
    title: str
    machine: str            # qemu-system-arm -M
    cpu_flags: tuple        # arm-none-eabi-gcc flags of its core
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    timer_base: int         # a CMSDK APB timer: CTRL, VALUE, RELOAD at +0, +4, +8
    timer_hz: int           # its clock

    def instructions(self, ticks: int) -> int:
        """Timer ticks as instructions under ``-icount shift=ICOUNT_SHIFT``."""
        return round(ticks * 1e9 / self.timer_hz / 2 ** ICOUNT_SHIFT)


BOARDS = {
    # Arm MPS2 with the AN386 FPGA image: a Cortex-M4 with FPU, 4 MB of code
    # SSRAM at 0 (the flash here) and 4 MB of data SSRAM at 0x20000000;
    # SYSCLK (the APB timers' clock) is 25 MHz.
    "mps2-an386": Board("mps2-an386", "Arm MPS2 AN386 (Cortex-M4F)", "mps2-an386", tuple(ARM_FLAGS),
                        0x00000000, 4 << 20, 0x20000000, 4 << 20, 0x40000000, 25_000_000),
}


def get_board(name: str) -> Board:
    if name not in BOARDS:
        raise ConvcError(f"board {name!r}: convc knows {', '.join(sorted(BOARDS))}")
    return BOARDS[name]


# -- the files ----------------------------------------------------------------
def entry_points(lib_dir, name: str) -> list[str]:
    """The functions ``NAME.h`` declares (``int NAME_run(...);`` ...): the
    library's API, the calls the counters time."""
    header = Path(lib_dir, f"{name}.h")
    if not header.exists():
        raise ConvcError(f"{header}: no such file; export the library first (convc export MODEL -o DIR "
                         f"--name {name})")
    found = re.findall(rf"^[A-Za-z_][\w \*]*?\b({re.escape(name)}_\w+)\s*\(", header.read_text(), re.M)
    return list(dict.fromkeys(found))


# file written -> its template in templates/c
BOARD_FILES = {"board_startup.c": "board_startup.c.j2", "board_count.S": "board_count.S.j2",
               "board.ld": "board_link.ld.j2", "Makefile": "board_Makefile.j2"}


@dataclass
class BuildPlan:
    """The command lines that build the program for a board, from one place:
    :func:`build` runs them and the Makefile holds the same."""
    board: Board
    name: str
    sources: list[str]      # C sources: the library, the harness, board_startup.c
    entries: list[str]      # the library's entry points, timed per call
    opt: str
    compile_flags: list[str] = field(default_factory=list)
    link_flags: list[str] = field(default_factory=list)

    @property
    def elf(self) -> str:
        return f"{self.name}_{self.board.name.replace('-', '_')}.elf"

    def compile_command(self, source: str) -> list[str]:
        strict = STRICT if source != "board_count.S" else []
        return [ARM_CC, *self.compile_flags, *strict, "-c", source, "-o", _object(source)]

    def link_command(self) -> list[str]:
        objs = [_object(s) for s in self.sources + ["board_count.S"]]
        return [ARM_CC, *self.compile_flags, *objs, *self.link_flags, "-o", self.elf]

    def qemu_command(self, elf: str | None = None) -> list[str]:
        # Semihosting output on a stdio chardev: the program's bytes on
        # stdout, QEMU's own messages on stderr (without chardev= QEMU 7.2
        # writes semihosting output to stderr); no display, monitor or UART.
        return [QEMU, "-M", self.board.machine, "-display", "none", "-monitor", "none", "-serial", "none",
                "-chardev", "stdio,id=console", "-semihosting-config", "enable=on,target=native,chardev=console",
                "-icount", f"shift={ICOUNT_SHIFT}", "-kernel", elf or self.elf]


def _object(source: str) -> str:
    return Path(source).stem + ".o"


def build_plan(lib_dir, name: str, board: str = "mps2-an386", opt: str = OPT, harness: str | None = None,
               entries: list[str] | None = None) -> BuildPlan:
    """The sources and flags of the board program made of the library in
    ``lib_dir`` (``NAME.c``, ``NAME_weights.c`` if there), its harness
    (``NAME_test.c`` or ``harness``) and the board support."""
    b = get_board(board)
    lib_dir = Path(lib_dir)
    sources = [f"{name}.c"] + ([f"{name}_weights.c"] if (lib_dir / f"{name}_weights.c").exists() else [])
    sources += [harness or f"{name}_test.c", "board_startup.c"]
    for s in sources[:-1]:
        if not (lib_dir / s).exists():
            raise ConvcError(f"{lib_dir / s}: no such file; export the library with its harness first "
                             f"(convc export MODEL -o {lib_dir} --name {name})")
    entries = entry_points(lib_dir, name) if entries is None else entries
    compile_flags = [*b.cpu_flags, opt, "-ffunction-sections", "-fdata-sections"]
    # The full newlib, not newlib-nano: the harnesses print int64 values with %lld,
    # which nano's printf does not know (flash is plentiful on this board).
    link_flags = ["-nostartfiles", "-T", "board.ld", "-Wl,--gc-sections",
                  *[f"-Wl,--wrap={e}" for e in entries], "-lm"]
    return BuildPlan(b, name, sources, entries, opt, compile_flags, link_flags)


def board_files(lib_dir, name: str, board: str = "mps2-an386", opt: str = OPT, harness: str | None = None,
                entries: list[str] | None = None, stack_bytes: int = STACK_BYTES) -> dict[str, str]:
    """The board support files for the library ``name`` in ``lib_dir``, by file name."""
    bp = build_plan(lib_dir, name, board, opt, harness, entries)
    ctx = dict(version=__version__, board=bp.board, name=name, entries=bp.entries, max_calls=MAX_CALLS,
               stack_bytes=stack_bytes, plan=bp, objects=[_object(s) for s in bp.sources + ["board_count.S"]],
               compile=" ".join(bp.compile_flags), link=" ".join(bp.link_flags), strict=" ".join(STRICT),
               qemu=" ".join(bp.qemu_command("$<")))
    env = environment()
    return {f: env.get_template(f"c/{t}").render(ctx) for f, t in BOARD_FILES.items()}


def write_board(lib_dir, name: str, board: str = "mps2-an386", **kw) -> list[Path]:
    """Write :func:`board_files` into ``lib_dir``; returns their paths."""
    paths = []
    for fname, text in board_files(lib_dir, name, board, **kw).items():
        path = Path(lib_dir, fname)
        if not path.exists() or path.read_text() != text:       # unchanged files keep their time (make)
            path.write_text(text)
        paths.append(path)
    return paths


# -- build and run --------------------------------------------------------------
def missing_tools() -> list[str]:
    """The programs a board run needs that are not on PATH (with the Debian
    package that has each), empty when all are there."""
    need = {ARM_CC: "gcc-arm-none-eabi", QEMU: "qemu-system-arm"}
    out = [f"{tool} (Debian: {pkg})" for tool, pkg in need.items() if not shutil.which(tool)]
    if not out and not _has_newlib():
        out.append("newlib for arm-none-eabi (Debian: libnewlib-arm-none-eabi)")
    return out


def _has_newlib() -> bool:
    try:
        proc = subprocess.run([ARM_CC, *ARM_FLAGS, "-print-file-name=libc.a"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return os.path.isabs(proc.stdout.strip())


def build(lib_dir, name: str = "model", board: str = "mps2-an386", opt: str = OPT, harness: str | None = None,
          entries: list[str] | None = None) -> Path:
    """Write the board files into ``lib_dir`` and build the program with
    ``arm-none-eabi-gcc`` (the library and harness with the strict flags
    ``-std=c99 -Wall -Wextra -Werror -pedantic``); returns the ELF's path."""
    missing = missing_tools()
    if missing:
        raise CompileError(f"building for board {board} needs {', '.join(missing)}")
    lib_dir = Path(lib_dir).resolve()
    write_board(lib_dir, name, board, opt=opt, harness=harness, entries=entries)
    bp = build_plan(lib_dir, name, board, opt, harness, entries)
    headers = sorted(lib_dir.glob("*.h"))
    for source in bp.sources + ["board_count.S"]:
        cmd = bp.compile_command(source)
        if not _fresh(lib_dir / _object(source), [lib_dir / source, *headers], cmd):
            run_tool(cmd, lib_dir)
            Path(lib_dir, _object(source) + ".cmd").write_text(" ".join(cmd))
    run_tool(bp.link_command(), lib_dir)
    return lib_dir / bp.elf


def _fresh(obj: Path, deps: list[Path], cmd: list[str]) -> bool:
    """Whether ``obj`` is newer than its source and the headers beside it
    and was built by the same command (its ``.o.cmd`` stamp), as make
    would judge: a second run after changing only the harness recompiles
    only the harness."""
    stamp = obj.with_name(obj.name + ".cmd")
    if not (obj.exists() and stamp.exists()) or stamp.read_text() != " ".join(cmd):
        return False
    return all(obj.stat().st_mtime_ns >= d.stat().st_mtime_ns for d in deps)


@dataclass
class Call:
    entry: str
    ticks: int
    instructions: int       # emulated: ticks x ns per tick at -icount shift=0


@dataclass
class QemuRun:
    """What one run under QEMU printed and measured."""
    board: Board
    elf: Path
    status: int             # the program's exit status
    output: str             # what the harness printed (the board's @convc lines removed)
    calls: list[Call]       # the entry points' calls in order (the first MAX_CALLS)
    total_calls: int
    stack_bytes: int        # the deepest stack of the whole run (painted stack)
    heap_bytes: int         # the heap malloc took (the harness's buffers)
    seconds: float          # host wall time of qemu-system-arm

    def instructions(self, entry: str) -> list[int]:
        return [c.instructions for c in self.calls if c.entry == entry]

    def table(self) -> str:
        """Instructions per entry point: calls, and the fewest, median and
        most instructions of one call (the fewest are usually calls the
        harness makes to check that bad arguments are rejected)."""
        lines = [f"{'entry point':<32} {'calls':>5} {'instructions: min':>18} {'median':>12} {'max':>12}"]
        for e in dict.fromkeys(c.entry for c in self.calls):
            n = sorted(self.instructions(e))
            lines.append(f"{e:<32} {len(n):>5} {n[0]:>18,} {n[len(n) // 2]:>12,} {n[-1]:>12,}")
        lines += [f"EMULATED, INDICATIVE: {self.board.title} under QEMU -M {self.board.machine} -icount "
                  f"shift={ICOUNT_SHIFT}, instructions from its {self.board.timer_hz / 1e6:g} MHz timer (one "
                  f"tick = {self.board.instructions(1)} instructions); QEMU models no pipeline, caches or wait "
                  f"states: not the cycles of a real chip",
                  f"stack {self.stack_bytes:,} bytes at most, heap {self.heap_bytes:,} bytes (the harness's "
                  f"buffers); exit status {self.status}; {self.seconds:.2f} s in QEMU"]
        return "\n".join(lines)

    __str__ = table


def run(lib_dir, name: str = "model", board: str = "mps2-an386", timeout: float = 60.0, opt: str = OPT,
        harness: str | None = None, check: bool = True, expect_status: int = 0) -> QemuRun:
    """Build the library in ``lib_dir`` with its harness for ``board``
    (:func:`build`) and run it under ``qemu-system-arm`` for at most
    ``timeout`` seconds of host time. With ``check`` (default), a
    :class:`QemuError` unless it exits with ``expect_status`` and, for status
    0, its last line is ``OK`` (the harness's verdict); a hang is killed at
    the timeout with a :class:`QemuTimeout`."""
    b = get_board(board)
    elf = build(lib_dir, name, board, opt, harness)
    cmd = build_plan(lib_dir, name, board, opt, harness).qemu_command(str(elf))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=lib_dir, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        said = (e.stdout or b"").decode("utf-8", "replace")
        raise QemuTimeout(f"{elf.name} on {b.title} did not end within {timeout:g} s and was killed "
                          f"(a hang, or raise timeout=); it printed:\n{_tail(said)}") from None
    except OSError as e:
        raise QemuError(f"running {QEMU} failed: {e}") from None
    seconds = time.perf_counter() - start
    result = parse(b, elf, proc.returncode, proc.stdout.decode("utf-8", "replace"), seconds)
    if check:
        where = f"{elf.name} on {b.title} (qemu-system-arm -M {b.machine})"
        err = proc.stderr.decode("utf-8", "replace").strip()
        fault = re.search(r"^@convc fault (\w+)", proc.stdout.decode("utf-8", "replace"), re.M)
        if fault:
            raise QemuError(f"{where}: {fault.group(1)} exception (exit status {proc.returncode}); it printed:\n"
                            f"{_tail(result.output)}")
        if proc.returncode != expect_status:
            raise QemuError(f"{where} exited with status {proc.returncode}, expected {expect_status}"
                            f"{' (the harness failed)' if 'FAIL' in result.output else ''}; it printed:\n"
                            f"{_tail(result.output)}{chr(10) + err if err else ''}")
        lines = result.output.strip().splitlines()
        if expect_status == 0 and (not lines or lines[-1] != "OK"):
            raise QemuError(f"{where} exited 0 but its harness did not print OK last; it printed:\n"
                            f"{_tail(result.output)}")
    return result


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(nothing)"


def parse(board: Board, elf: Path, status: int, stdout: str, seconds: float) -> QemuRun:
    """Split the program's output into the harness's lines and the board's
    ``@convc`` lines (calls and their ticks, stack, heap)."""
    calls, facts, output = [], {}, []
    for line in stdout.replace("\r\n", "\n").splitlines():
        m = re.fullmatch(r"@convc call (\S+) ticks (\d+)", line)
        if m:
            ticks = int(m.group(2))
            calls.append(Call(m.group(1), ticks, board.instructions(ticks)))
        elif line.startswith("@convc "):
            key, _, value = line[7:].partition(" ")
            facts[key] = value
        else:
            output.append(line)
    num = lambda k: int(facts[k]) if facts.get(k, "").isdigit() else 0      # noqa: E731
    return QemuRun(board, elf, status, "\n".join(output), calls, num("calls"), num("stack_bytes"),
                   num("heap_bytes"), seconds)


# -- command line -------------------------------------------------------------
def cmd_board(args) -> None:
    """``convc export ... --board B [--run-qemu]``: the board files beside the
    exported library, then (``--run-qemu``) the run and its report."""
    if args.out is None:
        raise ConvcError("convc export --board/--run-qemu: give -o DIR (the board files go beside the library)")
    if args.run_qemu:
        result = run(args.out, name=args.name, board=args.board, timeout=args.qemu_timeout)
        print(f"wrote {', '.join(BOARD_FILES)} in {args.out}; built {result.elf.name}")
        print(f"ran it under {QEMU} -M {result.board.machine}: the harness printed OK")
        print(result.table())
    else:
        paths = write_board(args.out, args.name, args.board)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        print(f"build and run: make -C {args.out} run   (needs arm-none-eabi-gcc, libnewlib-arm-none-eabi, "
              f"qemu-system-arm)")
