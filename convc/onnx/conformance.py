"""ONNX conformance: the backend node tests of the ``onnx`` package, for the
ops convc imports, run on a convc target.

The onnx wheel ships the generators of its node tests
(``onnx.backend.test.case.node``): each case is a one-node model with input
and expected output arrays, the data its ``.pb`` files are made from. Every
case whose nodes all belong to :data:`OPS` applies; it passes when
``from_onnx`` imports it, the target compiles it, and the outputs match within
the case's own tolerance (onnx's runner: rtol 1e-3, atol 1e-7).

convc compiles for static shapes, so graph inputs that fill a compile-time
slot (:data:`convc.onnx.STATIC_INPUTS`: Reshape's shape, Pad's pads, Clip's
bounds, Dropout's ratio and mode) are bound as constants from the case's data;
every other input is fed at run time.

    python -m convc.onnx.conformance [--target c] [--write FILE]   # the Markdown of README's ONNX section
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings

import numpy as np

from ..errors import ConvcError

# The ops of issue 8, in its order, then the quantized ops of issue 15.
OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "LeakyRelu", "Clip",
       "Sigmoid", "Tanh", "Add", "Sub", "Mul", "Div", "Concat", "Flatten", "Reshape", "Transpose", "Gemm",
       "MatMul", "BatchNormalization", "Softmax", "Pad", "Identity", "Dropout",
       "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")

# The cases that cannot pass: (why, a regex the error convc raises for each
# of them matches -- the tests check that it does, cases).
CANNOT_PASS = [
    ("Pad modes other than constant (edge, reflect, wrap); these cases are int32 as well",
     r"mode '(edge|reflect|wrap)' is not supported", ["test_edge_pad", "test_reflect_pad", "test_wrap_pad"]),
    ("training mode: batch statistics in BatchNormalization, random Dropout (convc imports inference graphs)",
     r"training_mode=1 \(batch statistics\) is not supported|training-mode Dropout",
     ["test_batchnorm_example_training_mode", "test_batchnorm_epsilon_training_mode", "test_training_dropout",
      "test_training_dropout_default", "test_training_dropout_mask", "test_training_dropout_default_mask"]),
    ("a second output: Dropout's mask (a bool tensor), MaxPool's argmax indices",
     r"\(the (mask, a bool tensor|argmax indices)\) is used",
     ["test_dropout_default_mask", "test_dropout_default_mask_ratio", "test_training_dropout_zero_ratio_mask",
      "test_maxpool_with_argmax_2d_precomputed_pads", "test_maxpool_with_argmax_2d_precomputed_strides"]),
    ("inputs that are not tensors (a sequence, an optional)", r"not a tensor",
     ["test_identity_sequence", "test_identity_opt"]),
    ("empty tensors (a dimension of size 0)", r"has an empty dimension", ["test_reshape_allowzero_reordered"]),
    ("quantized types other than int8 and uint8 (float8, float4, int16, int4, int2 and unsigned forms): convc "
     "quantizes to int8/uint8 (and computes in none of the sub-byte or float8 types)",
     r"dtype (float8\w*|float4\w*|u?int[24]) is not supported|zero point .* must be an int8 or uint8 .* got "
     r"(float8\w*|float4\w*|u?int(2|4|16))|input 'x' is u?int16; convc dequantizes int8 and uint8",
     ["test_dequantizelinear_e4m3fn", "test_dequantizelinear_e4m3fn_float16", "test_dequantizelinear_e4m3fn_zero_point",
      "test_dequantizelinear_e5m2", "test_dequantizelinear_float4e2m1", "test_dequantizelinear_int16",
      "test_dequantizelinear_int2", "test_dequantizelinear_int4", "test_dequantizelinear_uint16",
      "test_dequantizelinear_uint2", "test_dequantizelinear_uint4", "test_quantizelinear_e4m3fn",
      "test_quantizelinear_e5m2", "test_quantizelinear_float4e2m1", "test_quantizelinear_int16",
      "test_quantizelinear_int2", "test_quantizelinear_int4", "test_quantizelinear_uint16", "test_quantizelinear_uint2",
      "test_quantizelinear_uint4"]),
    ("blocked quantization (block_size): convc quantizes per tensor or per axis",
     r"block_size=\d+ \(blocked quantization\) is not supported",
     ["test_dequantizelinear_blocked", "test_quantizelinear_blocked_asymmetric",
      "test_quantizelinear_blocked_symmetric"]),
]
EXPECTED_FAILURES: dict[str, tuple[str, str]] = {case: (why, pattern) for why, pattern, cases in CANNOT_PASS
                                                 for case in cases}


def select_cases(ops=OPS):
    """The node test cases whose every node is one of ``ops``, by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the generators of other ops warn about overflowing casts
        from onnx.backend.test.case.node import collect_testcases
        cases = collect_testcases(None)
    picked = [c for c in cases if c.kind == "node" and c.model.graph.node
              and all(n.op_type in ops and n.domain in ("", "ai.onnx") for n in c.model.graph.node)]
    return sorted(picked, key=lambda c: c.name)


def static_bindings(model, inputs) -> tuple[dict, dict]:
    """Split a case's input arrays into compile-time ``constants`` (inputs in
    a STATIC_INPUTS slot) and run-time feeds, both by ONNX input name."""
    from . import STATIC_INPUTS

    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    static = {n.input[i] for n in model.graph.node for i in STATIC_INPUTS.get(n.op_type, ())
              if i < len(n.input) and n.input[i]}
    constants, feeds = {}, {}
    for name, arr in zip(names, inputs):
        if type(arr).__name__ == "TensorProto":        # types numpy lacks (float8, int4) come as TensorProtos
            from onnx import numpy_helper
            arr = numpy_helper.to_array(arr)
        (constants if name in static else feeds)[name] = arr
    return constants, feeds


def run_case(case, target: str = "c") -> None:
    """Import, compile and run one case; returns if it passes, else raises
    ConvcError (convc cannot take it) or AssertionError (wrong numbers)."""
    from ..api import compile as cc_compile
    from . import from_onnx, node_name
    from .validate import OnnxOpsetWarning

    for inputs, expected in case.data_sets:
        constants, feeds = static_bindings(case.model, inputs)
        with warnings.catch_warnings():      # the suite's newest cases are past the opset convc checked: known
            warnings.simplefilter("ignore", OnnxOpsetWarning)
            g = from_onnx(case.model, constants=constants)
        mod = cc_compile(g, target=target)
        got = mod.run({node_name(n, "input"): a for n, a in feeds.items()})
        assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
        for (oname, y), want in zip(got.items(), expected):
            want = np.asarray(want)
            assert y.shape == want.shape, f"output {oname}: shape {y.shape}, expected {want.shape}"
            assert y.dtype == want.dtype, f"output {oname}: dtype {y.dtype}, expected {want.dtype}"
            np.testing.assert_allclose(y, want, rtol=case.rtol, atol=case.atol, err_msg=f"output {oname}")


def outcome(case, target: str = "c") -> tuple[bool, str]:
    """(passed, reason): for an import error, every problem it lists."""
    from . import OnnxImportError

    try:
        run_case(case, target)
    except (ConvcError, AssertionError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if isinstance(e, OnnxImportError):
            lines = lines[1:]                   # the header line names the model only
        return False, "; ".join(lines[:3]) or type(e).__name__
    return True, ""


def report(target: str = "c") -> str:
    """The conformance section as Markdown."""
    import onnx

    cases = select_cases()
    results = [(c.name, *outcome(c, target)) for c in cases]
    passed = sum(ok for _, ok, _ in results)
    by_op: dict[str, list[int]] = {}
    for c, (_, ok, _) in zip(cases, results):
        op = c.model.graph.node[0].op_type
        by_op.setdefault(op, [0, 0])
        by_op[op][0] += ok
        by_op[op][1] += 1
    lines = [
        "## ONNX",
        "",
        "Models from PyTorch and friends come in as ONNX files (`pip install \"convc[onnx]\"`):",
        "",
        "```",
        "convc run model.onnx --input x.npy -o out   # compile (--target c|numpy), run, write out/NAME.npy",
        "convc compile model.onnx                    # the imported IR and its cost table",
        "convc export model.onnx -o lib              # the embedded C99 library",
        "```",
        "",
        "```python",
        "g = cc.from_onnx(\"model.onnx\", input_shapes={\"x\": (1, 3, 224, 224)})   # shapes only for symbolic dims",
        "model = cc.to_onnx(g)            # back to ONNX: passes onnx.checker, same outputs in onnx.reference",
        "```",
        "",
        f"`from_onnx` maps {', '.join(OPS)} (and Squeeze, Unsqueeze, Slice, Split, Expand, ReduceSum, ReduceMean, "
        "Resize, Upsample) to convc ops, with every attribute of the convolutions and pools "
        "(auto_pad, asymmetric pads, dilations, groups, ceil_mode, count_include_pad, output_shape). "
        "Initializers become params named after them; nodes whose inputs are known at compile time "
        "(constants, and the `Shape` of any tensor: convc shapes are static) are folded, so the "
        "Shape/Gather/Concat chains exporters write for reshape targets disappear. A model convc cannot take "
        "raises one `ConvcError` that lists every unsupported node with its type, name and reason. "
        "`tests/test_onnx_models.py` exports a ResNet-style, a MobileNet-style, a DCGAN generator and a 1D "
        "audio net from torch (with both torch exporters) and checks convc's C output against torch's.",
        "",
        "### Conformance",
        "",
        f"The backend node tests of onnx {onnx.__version__} for the {len(OPS)} ops convc imports, run on the "
        f"`{target}` target: **{passed} of {len(results)} pass**. Regenerate this section with "
        f"`python -m convc.onnx.conformance --target {target}`; `tests/test_onnx_import.py` runs every case.",
        "",
        "Inputs that convc needs at compile time (Reshape's shape, Pad's pads, Clip's bounds, Dropout's ratio "
        "and training mode, the quantized ops' scales and zero points) are bound as constants from the case's "
        "data; all others are fed at run time. "
        "Outputs must match within each case's tolerance (onnx's: rtol 1e-3, atol 1e-7).",
        "",
        "| op | pass | cases |",
        "|---|---:|---:|",
    ]
    lines += [f"| {op} | {p} | {t} |" for op, (p, t) in sorted(by_op.items())]
    failing = {n: why for n, ok, why in results if not ok}
    if failing:
        lines += ["", f"The {len(failing)} cases that do not pass, and why:", "", "| reason | cases |", "|---|---|"]
        for why, pattern, names in CANNOT_PASS:
            shown = [n for n in names if n in failing and re.search(pattern, failing[n])]
            if shown:
                lines.append(f"| {why} | {', '.join(f'`{n}`' for n in sorted(shown))} |")
        for n, error in failing.items():        # not (or not so) expected: convc's own words
            if n not in EXPECTED_FAILURES or not re.search(EXPECTED_FAILURES[n][1], error):
                lines.append(f"| {error.replace('|', '/')} | `{n}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convc.onnx.conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="c", help="convc target (default: c)")
    p.add_argument("--write", metavar="FILE", help="write the Markdown to FILE instead of printing it")
    args = p.parse_args(argv)
    text = report(args.target)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(next(line for line in text.splitlines() if " pass**" in line))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
