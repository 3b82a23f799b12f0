"""Real models: torchvision's classifiers and a segmentation model with
Resize, exported with ``torch.onnx.export`` (random weights, batch 1, a small
input), imported with ``cc.from_onnx``, compiled with ``cc.compile`` (default
pipeline, C target) and checked against ONNX Runtime within 1e-4 of the
output's scale -- the check of ``convc bench --models``, whose model list,
torchvision loading and cached export these tests reuse.

Compiling the seven models takes minutes and needs torchvision, onnxruntime
and onnxscript, which the test extra leaves out, so the file runs only with
``CONVC_TEST_MODELS=1``::

    pip install torchvision==0.28.0 onnxruntime==1.32.0
    CONVC_TEST_MODELS=1 python -m pytest -s tests/test_torchvision_models.py
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

if os.environ.get("CONVC_TEST_MODELS", "") in ("", "0"):
    pytest.skip("torchvision models through ONNX take minutes to compile; set CONVC_TEST_MODELS=1 to run them",
                allow_module_level=True)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime", reason="the reference is ONNX Runtime: pip install onnxruntime==1.32.0")
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")

import convc as cc  # noqa: E402
from convc import bench  # noqa: E402

try:
    bench.torchvision_models()
except ImportError:
    pytest.skip("torchvision is not installed: pip install torchvision==0.28.0", allow_module_level=True)


def _lraspp():
    return bench.torchvision_models().segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)


SIZE = (3, 64, 64)
MODELS = [bench.TorchModel(m.name, m.what, quick_size=SIZE) for m in bench.MODELS] + [
    bench.TorchModel("lraspp_mobilenet_v3_large", "LR-ASPP MobileNetV3-Large (bilinear Resize, HardSwish, "
                     "squeeze-excitation, dilated convs)", build=_lraspp, quick_size=SIZE)]


@pytest.mark.parametrize("spec", MODELS, ids=[m.name for m in MODELS])
def test_model_matches_onnx_runtime(spec):
    shape = spec.input_shape(quick=True)
    net = bench.build_model(spec, torch)
    model = bench.exported_onnx(spec, net, shape, torch, progress=lambda msg: None)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    want = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: x})

    t0 = time.perf_counter()
    g = cc.from_onnx(model, name=spec.name)
    t1 = time.perf_counter()
    mod = cc.compile(g)
    t2 = time.perf_counter()
    got = list(mod.run({g.input_names[0]: x}).values())

    assert len(got) == len(want)
    errors = [bench.relative_error(y, w) for y, w in zip(got, want)]
    print(f"\n{spec.name}: input {'x'.join(map(str, shape[1:]))}, max error {max(errors):.2e} of the output "
          f"scale, import {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    assert max(errors) <= bench.MODEL_RTOL, (
        f"{spec.name}: convc differs from ONNX Runtime by {max(errors):.2e} of the output scale "
        f"(allowed {bench.MODEL_RTOL:.0e})")
