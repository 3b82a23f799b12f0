"""cc.explain / convc explain: the page's facts (per-pass error, memory
picture, sections, generated C) and the page itself in a real browser."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import convc as cc
from convc import models
from convc.explain import explain, memory_picture
from convc.schedule import plan

import helpers

BROWSER_REQUIRED = os.environ.get("CONVC_REQUIRE_BROWSER", "") not in ("", "0")


def _rng_w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _winograd_model():
    rng = np.random.default_rng(0)
    g = cc.Graph("wino")
    x = g.input("x", (1, 8, 12, 12))
    h = cc.relu(cc.conv(x, _rng_w(rng, 16, 8, 3, 3), _rng_w(rng, 16), padding=1, name="c3x3"))
    h = cc.conv(h, _rng_w(rng, 16, 16, 3, 3), stride=2, padding=1, name="strided")
    g.output(h, "y")
    return g


def test_errors_are_zero_for_exact_rewrites_and_real_for_transforms():
    g = _winograd_model()
    ex = explain(g, ["strided_to_downsampled", "conv_to_winograd", "conv_to_fft"], timing=False, embedded=False,
                 progress=False)
    steps = {s.name: s for s in ex.steps[1:]}
    assert steps["strided_to_downsampled"].report.changed and steps["conv_to_winograd"].report.changed
    for s in ex.steps[1:]:
        assert s.c_error is None
        assert [e.output for e in s.errors] == ["y"]
        assert s.errors[0].ref_abs == 0          # every op keeps its meaning in the reference
    strided = steps["strided_to_downsampled"].errors[0]
    assert strided.c_rel <= 1e-6                 # the same sums: rounding at most
    wino = steps["conv_to_winograd"].errors[0]
    assert 0 < wino.c_rel < 1e-4                 # the transforms round differently: a real number
    fft_g = cc.Graph("f")
    fft_g.output(cc.conv(fft_g.input("x", (1, 2, 12, 12)), _rng_w(np.random.default_rng(1), 3, 2, 5, 5), padding=2),
                 "y")
    fft = explain(fft_g, ["conv_to_fft"], timing=False, embedded=False, progress=False).steps[1]
    assert fft.report.changed and 0 < fft.errors[0].c_rel < 1e-4


def test_measured_error_uses_the_given_inputs(tmp_path):
    g = _winograd_model()
    x = np.zeros((1, 8, 12, 12), np.float32)
    path = tmp_path / "in.npz"
    np.savez(path, x=x)
    ex = explain(g, ["conv_to_winograd"], inputs=str(path), timing=False, embedded=False, progress=False)
    assert np.array_equal(ex.feeds["x"], x)
    with pytest.raises(cc.ConvcError, match="input"):
        explain(g, ["conv_to_winograd"], inputs={"x": np.zeros((2, 2), np.float32)}, progress=False)
    with pytest.raises(cc.ConvcError, match="cannot read inputs"):
        explain(g, ["conv_to_winograd"], inputs=str(tmp_path / "missing.npz"), progress=False)


def test_memory_picture_has_one_bar_per_buffer_and_the_arena_of_cost():
    for g in (models.lenet5(), cc.passes.run(models.mobilenet_tiny(), "default")):
        pic = memory_picture(g, "t")
        p = plan(g)
        bars = re.findall(r'<rect class="buf"[^>]*data-offset="(\d+)" data-bytes="(\d+)"', pic.svg)
        assert len(bars) == pic.buffers == len([b for b in p.buffers if b.offset >= 0]) > 0
        assert pic.arena_bytes == cc.cost(g).arena_bytes == int(re.search(r'data-arena="(\d+)"', pic.svg)[1])
        assert max(int(o) + int(n) for o, n in bars) <= pic.arena_bytes
        assert 'class="peak"' in pic.svg


def test_page_holds_every_pass_the_memory_the_times_and_the_c(tmp_path):
    g = models.lenet5()
    ex = explain(g, "default", progress=False)
    page = ex.html()
    assert ex._repr_html_() == page
    for i, s in enumerate(ex.steps):
        assert f"id=step-{i:02d}" in page
        if i:
            assert s.name in page
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="memory"') == 2     # module and export
    for n in plan(ex.final).order:
        assert f"id=c-{n.replace('.', '_')}" in page, n
    assert set(ex.times) == set(plan(ex.final).order) and all(t > 0 for t in ex.times.values())
    assert "http://" not in page.replace("http://www.w3.org", "")      # self-contained: no network
    assert "<script src" not in page
    path = ex.save(tmp_path / "p.html")
    assert open(path, encoding="utf-8").read() == page


def test_cli_writes_the_page(tmp_path):
    out = tmp_path / "r.html"
    res = subprocess.run([sys.executable, "-m", "convc", "explain", "lenet5", "-o", str(out), "--passes",
                          "fuse_epilogues,conv_to_gemm", "--no-timing", "--quiet"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "2 passes" in res.stdout and out.exists()
    page = out.read_text()
    assert "fuse_epilogues" in page and "conv_to_gemm" in page
    res = subprocess.run([sys.executable, "-m", "convc", "explain", "lenet5", "-o", str(out), "--pipeline", "nope"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "unknown pipeline" in res.stderr


def test_onnx_models_explain(tmp_path):
    pytest.importorskip("onnx")
    g = models.lenet5()
    path = tmp_path / "lenet.onnx"
    cc.to_onnx(g, path=str(path))
    from convc.export import load_model
    ex = explain(load_model(str(path)), ["fuse_epilogues"], timing=False, progress=False)
    assert ex.steps[1].report.changed and ex.steps[1].errors[0].c_rel <= 1e-6


def test_seed_walkthrough_pages(tmp_path, capsys):
    sys.path.insert(0, str(helpers.REPO / "examples"))
    try:
        import explain_seeds
    finally:
        sys.path.pop(0)
    explain_seeds.main(str(tmp_path))
    out = capsys.readouterr().out
    for name in ("strided", "transposed", "separable", "fft", "tiled"):
        assert (tmp_path / f"{name}.html").exists(), name
    assert "MACs 13,824 -> 55,296" in out                      # stride 2: s^2 = 4 times the work
    assert "MACs 10,356 -> 10,347" in out                      # 81 -> 72 (the 10 275 stay)
    sep = (tmp_path / "separable.html").read_text()
    assert "86,400" in sep and "10 275" in sep


# -- in a real browser ----------------------------------------------------------------
def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if BROWSER_REQUIRED:
        pytest.fail("CONVC_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install chromium)")
    pytest.skip("no headless browser here (apt-get install chromium); set CONVC_REQUIRE_BROWSER=1 to fail instead")


def _headless(browser, *args, timeout=120):
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=timeout)


def _console(stderr: str) -> list[str]:
    """The page's console messages (chromium logs each as a CONSOLE line)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


def _png_pixels(path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what chromium writes)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 255
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)


def test_console_check_catches_a_broken_page(tmp_path):
    """The browser check itself: a page with a script error is caught."""
    browser = _browser()
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>notDefined();</script></body></html>")
    res = _headless(browser, "--dump-dom", bad.as_uri())
    assert any("notDefined" in line for line in _console(res.stderr)), res.stderr[-2000:]


def test_page_in_a_real_browser(tmp_path):
    browser = _browser()
    ex = explain(models.lenet5(), "default", progress=False)
    page = tmp_path / "lenet.html"
    ex.save(page)
    res = _headless(browser, "--dump-dom", page.as_uri() + "#c-conv1_relu")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == [], _console(res.stderr)
    dom = res.stdout
    for i in range(len(ex.steps)):
        assert f'id="step-{i:02d}"' in dom
    assert 'id="memory"' in dom and 'id="code"' in dom
    shot = tmp_path / "shot.png"
    res = _headless(browser, f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars", page.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    px = _png_pixels(shot)[..., :3]
    assert px.shape[:2] == (1400, 1000)
    dark = (px.mean(axis=2) < 128).mean()
    assert 0.005 < dark < 0.5 and len(np.unique(px.reshape(-1, 3), axis=0)) > 20     # text and tables, not blank
