"""The embedded export's weight arrays (``convc/export.py``, template
``templates/c/export_weight.j2``): in every format ("bytes", "hex",
"decimal") and for every dtype, the array the node functions read holds the
weights bit for bit. Checked through C: a strict C99 program built from the
rendered arrays writes them back to stdout, compared byte for byte with
numpy's; the escapes of the bytes form are checked on the characters C
treats specially (quote, backslash, trigraph ``??=``, an octal digit after
an escape). Only the decimal form loses NaN payloads (C's ``NAN``)."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import convc as cc
from convc.codegen.env import CTYPES, environment
from convc.errors import ConvcError
from convc.cli import main
from convc.export import WEIGHT_FORMATS, c_string, c_words, export_c, weight_init

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    f32 = np.concatenate([np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1.17549435e-38, 3.4028235e38], np.float32),
                          np.array([0x7fc00001, 0xffbadbad], np.uint32).view(np.float32),   # NaNs with payloads
                          rng.standard_normal(997).astype(np.float32)])
    f64 = np.concatenate([np.array([0.0, -0.0, np.inf, 5e-324, -1.7976931348623157e308]),
                          np.array([0x7ff8000000000bad], np.uint64).view(np.float64), rng.standard_normal(300)])
    tricky = np.frombuffer(b'??=??/"\\\x01' + b"7\x0207\x7f0?\x00\x005" + bytes(range(256)), np.uint8)
    return {"float32": f32, "float64": f64,
            "int32": np.array([-2**31, 2**31 - 1, 0, -1, 12345], np.int32),
            "int64": np.array([-2**63, 2**63 - 1, 0, -1], np.int64),
            "int8": np.concatenate([tricky.view(np.int8), rng.integers(-128, 128, 500).astype(np.int8)]),
            "uint8": tricky.copy(), "int16": np.array([-32768, 32767, 0, 63, 0x3f3f], np.int16),
            "one": np.array([1.5], np.float32)}


def test_weights_read_back_bit_exact_through_c(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    macros = environment().get_template("c/export_weight.j2").module
    data = arrays()
    params, dumps, expected = [], [], b""
    for fmt in WEIGHT_FORMATS:
        for name, a in data.items():
            p = dict(T=CTYPES[name if name != "one" else "float32"], var=f"w_{fmt}_{name}", length=a.size,
                     note=f"{name} {fmt}", **weight_init(a, fmt))
            params.append(p)
            dumps.append(f"    fwrite({p['var']}{'.v' if p['word'] else ''}, sizeof(*{p['var']}"
                         f"{'.v' if p['word'] else ''}), {a.size}, stdout);")
            if fmt == "decimal" and a.dtype.kind == "f":    # C literals have no NaN payloads: NAN is the quiet NaN
                a = np.where(np.isnan(a), a.dtype.type(np.nan), a)
            expected += a.tobytes()
    src = ["#include <math.h>", "#include <stdint.h>", "#include <stdio.h>", str(macros.weight_prologue(params))]
    src += [str(macros.weight_array(p, "static ")) for p in params]
    src += ["int main(void)", "{", *dumps, "    return 0;", "}", ""]
    (tmp_path / "w.c").write_text("\n".join(src))
    subprocess.run(["gcc", *STRICT, "-O2", "-o", "w", "w.c", "-lm"], cwd=tmp_path, check=True, capture_output=True)
    got = subprocess.run(["./w"], cwd=tmp_path, check=True, capture_output=True).stdout
    assert got == expected      # the host is little-endian, as numpy's bytes are


def test_forms_are_what_they_say():
    a = np.array([1.0, -2.0], np.float32)
    assert c_words(a) == ["0x3f800000, 0xc0000000"]
    assert c_words(np.array([1.0])) == ["0x3ff0000000000000"]
    assert weight_init(a, "hex")["word"] == "uint32_t"
    assert weight_init(np.array([1, 2], np.int8), "hex")["word"] == ""      # 1-byte: decimal, order-free
    b = weight_init(a, "bytes")
    assert b["string"] and b["length_bytes"] == 8 and b["lines"] == ['"\\0\\0\\200?\\0\\0\\0\\300"'.replace("?", "\\77")]
    # an escape followed by an octal digit takes all three digits; ? never appears (trigraphs)
    assert c_string(b"\x01" + b"7" + b"\x01" + b"x") == ['"\\0017\\1x"']
    assert "?" not in "".join(c_string(b"??=" * 10))
    with pytest.raises(ConvcError, match="weight format 'base64'"):
        weight_init(a, "base64")


@pytest.mark.parametrize("fmt", ["hex", "decimal"])
def test_cli_weight_format(fmt, tmp_path, capsys):
    """``convc export --weight-format``: the chosen form lands in NAME.c."""
    assert main(["export", "lenet5", "-o", str(tmp_path), "--name", "l", "--weight-format", fmt]) == 0
    text = (tmp_path / "l.c").read_text()
    assert bool(re.search(r"union \{ uint32_t bits\[150\]; float v\[150\]; \} l_p_conv1_w", text)) == (fmt == "hex")
    assert bool(re.search(r"static const float l_p_conv1_w\[150\] = \{", text)) == (fmt == "decimal")


def test_bad_weight_format_is_refused(tmp_path):
    with pytest.raises(ConvcError, match="weight format 'words'.*bytes, hex, decimal"):
        export_c(cc.models.lenet5(), tmp_path, weight_format="words")


def test_big_endian_target_stops_at_the_bytes_form(tmp_path):
    """A big-endian target (arm-none-eabi-gcc -mbig-endian) cannot compile the
    bytes form (its little-endian bytes would be read wrong): an #error that
    says to use hex; the hex form compiles there."""
    from test_export import need_arm
    need_arm()
    g = cc.models.lenet5()
    flags = ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mbig-endian", *STRICT, "-Os", "-c"]
    for fmt, ok in (("bytes", False), ("hex", True)):
        export_c(g, tmp_path / fmt, name="net", weights_file=True, harness=False, weight_format=fmt)
        run = subprocess.run([*flags, "net_weights.c", "-o", "w.o"], cwd=tmp_path / fmt, capture_output=True,
                             text=True)
        assert (run.returncode == 0) == ok, run.stderr
        if not ok:
            assert "export with --weight-format hex for a big-endian target" in run.stderr
