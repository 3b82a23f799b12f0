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
import functools
import re
import sys
import warnings

import numpy as np

from ..errors import ConvcError

# The ops convc claims: every node case of theirs passes or is in CANNOT_PASS.
# The ops of issue 8, in its order; the quantized ops of issue 15; then issue 20's.
OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "LeakyRelu", "Clip",
       "Sigmoid", "Tanh", "Add", "Sub", "Mul", "Div", "Concat", "Flatten", "Reshape", "Transpose", "Gemm",
       "MatMul", "BatchNormalization", "Softmax", "Pad", "Identity", "Dropout",
       "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
       "Squeeze", "Unsqueeze", "Slice", "Split", "Expand", "Resize", "Upsample", "Gelu", "HardSigmoid", "HardSwish",
       "Shape", "Size", "Constant", "ConstantOfShape", "Range",
       # issue 20: math and activations (ops_math.py and the activation table)
       "Sum", "Mean", "Max", "Min", "Pow", "PRelu", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Erf", "Elu",
       "Selu", "Softplus", "Softsign", "ThresholdedRelu", "Mish",
       # reductions, pools, normalizations (ops_reduce.py)
       "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
       "ReduceLogSumExp", "GlobalMaxPool", "LpPool", "LRN", "InstanceNormalization", "LpNormalization",
       "GroupNormalization", "LayerNormalization",
       # tensor ops (ops_tensor.py)
       "DepthToSpace", "SpaceToDepth", "Tile", "Gather", "Cast", "CastLike", "Where", "Einsum")

CONV_NET_OPS = frozenset((
    # issue 8: the ops of the classic conv nets
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "LeakyRelu", "Clip", "Sigmoid",
    "Tanh", "Add", "Sub", "Mul", "Div", "Concat", "Flatten", "Reshape", "Transpose", "Gemm", "MatMul",
    "BatchNormalization", "Softmax", "Pad", "Identity", "Dropout",
    # issue 20: the rest of the conv-net model zoos' ops (AlexNet to EfficientNet, the super-resolution and
    # style-transfer nets), in its order
    "LRN", "Sum", "Mean", "Max", "Min", "Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "Split", "Gather", "Tile", "Pow",
    "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Erf", "Gelu", "Elu", "Selu", "PRelu", "Softplus", "Softsign",
    "ThresholdedRelu", "Mish", "HardSigmoid", "HardSwish", "GlobalMaxPool", "LpPool", "InstanceNormalization",
    "LpNormalization", "GroupNormalization", "LayerNormalization", "DepthToSpace", "SpaceToDepth", "Upsample",
    "Resize", "Cast", "ConstantOfShape", "Range", "Where", "Equal", "Greater", "Less", "Einsum",
    # the glue exporters write around them (reshape targets, weights as constants)
    "Shape", "Size", "Constant", "Slice", "Expand"))
"""The ops of conv nets: the subset whose cases the issue's goal counts
(more than 90% of them pass). The quantized ops are not in it: their cases
are mostly of the float8, int4 and blocked forms of language-model
quantization; their counts are in the per-op table."""

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
    ("empty tensors (a dimension of size 0: an empty input, reduction, slice or split part)",
     r"has an empty dimension|is empty",
     ["test_castlike_BFLOAT16_to_FLOAT_expanded", "test_castlike_DOUBLE_to_FLOAT16_expanded",
      "test_castlike_DOUBLE_to_FLOAT_expanded", "test_castlike_FLOAT16_to_DOUBLE_expanded",
      "test_castlike_FLOAT16_to_FLOAT4E2M1_expanded", "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ_expanded",
      "test_castlike_FLOAT16_to_FLOAT8E4M3FN_expanded", "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ_expanded",
      "test_castlike_FLOAT16_to_FLOAT8E5M2_expanded", "test_castlike_FLOAT16_to_FLOAT_expanded",
      "test_castlike_FLOAT16_to_INT2_expanded", "test_castlike_FLOAT16_to_INT4_expanded",
      "test_castlike_FLOAT16_to_UINT2_expanded", "test_castlike_FLOAT16_to_UINT4_expanded",
      "test_castlike_FLOAT4E2M1_to_FLOAT16_expanded", "test_castlike_FLOAT4E2M1_to_FLOAT_expanded",
      "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT16_expanded", "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT_expanded",
      "test_castlike_FLOAT8E4M3FN_to_FLOAT16_expanded", "test_castlike_FLOAT8E4M3FN_to_FLOAT_expanded",
      "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT16_expanded", "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT_expanded",
      "test_castlike_FLOAT8E5M2_to_FLOAT16_expanded", "test_castlike_FLOAT8E5M2_to_FLOAT_expanded",
      "test_castlike_FLOAT_to_BFLOAT16_expanded", "test_castlike_FLOAT_to_DOUBLE_expanded",
      "test_castlike_FLOAT_to_FLOAT16_expanded", "test_castlike_FLOAT_to_FLOAT4E2M1_expanded",
      "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ_expanded", "test_castlike_FLOAT_to_FLOAT8E4M3FN_expanded",
      "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ_expanded", "test_castlike_FLOAT_to_FLOAT8E5M2_expanded",
      "test_castlike_FLOAT_to_INT2_expanded", "test_castlike_FLOAT_to_INT4_expanded",
      "test_castlike_FLOAT_to_UINT2_expanded", "test_castlike_FLOAT_to_UINT4_expanded",
      "test_castlike_INT2_to_FLOAT16_expanded", "test_castlike_INT2_to_FLOAT_expanded",
      "test_castlike_INT2_to_INT8_expanded", "test_castlike_INT4_to_FLOAT16_expanded",
      "test_castlike_INT4_to_FLOAT_expanded", "test_castlike_INT4_to_INT8_expanded",
      "test_castlike_UINT2_to_FLOAT16_expanded", "test_castlike_UINT2_to_FLOAT_expanded",
      "test_castlike_UINT2_to_UINT8_expanded", "test_castlike_UINT4_to_FLOAT16_expanded",
      "test_castlike_UINT4_to_FLOAT_expanded", "test_castlike_UINT4_to_UINT8_expanded",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ_expanded",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN_expanded",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ_expanded",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2_expanded",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ_expanded",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN_expanded",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ_expanded",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2_expanded", "test_reduce_l1_empty_set",
      "test_reduce_l1_empty_set_expanded", "test_reduce_l2_empty_set",
      "test_reduce_log_sum_empty_set_expanded", "test_reduce_log_sum_exp_empty_set",
      "test_reduce_max_empty_set", "test_reduce_max_empty_set_bool", "test_reduce_min_empty_set",
      "test_reduce_prod_empty_set", "test_reduce_sum_empty_set",
      "test_reduce_sum_empty_set_non_reduced_axis_zero", "test_reduce_sum_square_empty_set",
      "test_reduce_sum_square_empty_set_expanded", "test_reshape_allowzero_reordered",
      "test_rotary_embedding_3d_input_expanded", "test_rotary_embedding_expanded",
      "test_rotary_embedding_interleaved_expanded", "test_rotary_embedding_no_position_ids_expanded",
      "test_rotary_embedding_no_position_ids_interleaved_expanded", "test_slice_start_out_of_bounds",
      "test_split_zero_size_splits_opset13", "test_split_zero_size_splits_opset18"]),
    ("types convc does not compute in: bool, float16, bfloat16, float8, float4, int2 and int4 (convc computes in "
     "float32, float64 and the 8- to 64-bit integers; a model's bool masks fold at import)",
     r"dtype (bool|float16|bfloat16|float8\w*|float4\w*|u?int[24]|string|complex\w*) is not supported|"
     r"target type \w+ is not supported|has dtype (bool|float16|bfloat16)",
     ["test_cast_BFLOAT16_to_FLOAT", "test_cast_DOUBLE_to_FLOAT16", "test_cast_FLOAT16_to_DOUBLE",
      "test_cast_FLOAT16_to_FLOAT", "test_cast_FLOAT16_to_FLOAT4E2M1", "test_cast_FLOAT16_to_FLOAT8E4M3FN",
      "test_cast_FLOAT16_to_FLOAT8E4M3FNUZ", "test_cast_FLOAT16_to_FLOAT8E5M2",
      "test_cast_FLOAT16_to_FLOAT8E5M2FNUZ", "test_cast_FLOAT16_to_INT2", "test_cast_FLOAT16_to_INT4",
      "test_cast_FLOAT16_to_UINT2", "test_cast_FLOAT16_to_UINT4", "test_cast_FLOAT4E2M1_to_FLOAT",
      "test_cast_FLOAT4E2M1_to_FLOAT16", "test_cast_FLOAT8E4M3FNUZ_to_FLOAT",
      "test_cast_FLOAT8E4M3FNUZ_to_FLOAT16", "test_cast_FLOAT8E4M3FN_to_FLOAT",
      "test_cast_FLOAT8E4M3FN_to_FLOAT16", "test_cast_FLOAT8E5M2FNUZ_to_FLOAT",
      "test_cast_FLOAT8E5M2FNUZ_to_FLOAT16", "test_cast_FLOAT8E5M2_to_FLOAT",
      "test_cast_FLOAT8E5M2_to_FLOAT16", "test_cast_FLOAT_to_BFLOAT16", "test_cast_FLOAT_to_FLOAT16",
      "test_cast_FLOAT_to_FLOAT4E2M1", "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_cast_FLOAT_to_FLOAT8E4M3FNUZ",
      "test_cast_FLOAT_to_FLOAT8E5M2", "test_cast_FLOAT_to_FLOAT8E5M2FNUZ", "test_cast_FLOAT_to_INT2",
      "test_cast_FLOAT_to_INT4", "test_cast_FLOAT_to_UINT2", "test_cast_FLOAT_to_UINT4",
      "test_cast_INT2_to_FLOAT", "test_cast_INT2_to_FLOAT16", "test_cast_INT2_to_INT8",
      "test_cast_INT4_to_FLOAT", "test_cast_INT4_to_FLOAT16", "test_cast_INT4_to_INT8",
      "test_cast_UINT2_to_FLOAT", "test_cast_UINT2_to_FLOAT16", "test_cast_UINT2_to_UINT8",
      "test_cast_UINT4_to_FLOAT", "test_cast_UINT4_to_FLOAT16", "test_cast_UINT4_to_UINT8",
      "test_cast_e8m0_FLOAT16_to_FLOAT8E8M0", "test_cast_e8m0_FLOAT8E8M0_to_FLOAT",
      "test_cast_e8m0_FLOAT8E8M0_to_FLOAT16", "test_cast_e8m0_FLOAT_to_FLOAT8E8M0",
      "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FN", "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ",
      "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2", "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ",
      "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FN", "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ",
      "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2", "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ",
      "test_castlike_BFLOAT16_to_FLOAT", "test_castlike_DOUBLE_to_FLOAT16", "test_castlike_FLOAT16_to_DOUBLE",
      "test_castlike_FLOAT16_to_FLOAT", "test_castlike_FLOAT16_to_FLOAT4E2M1",
      "test_castlike_FLOAT16_to_FLOAT8E4M3FN", "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ",
      "test_castlike_FLOAT16_to_FLOAT8E5M2", "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ",
      "test_castlike_FLOAT16_to_INT2", "test_castlike_FLOAT16_to_INT4", "test_castlike_FLOAT16_to_UINT2",
      "test_castlike_FLOAT16_to_UINT4", "test_castlike_FLOAT4E2M1_to_FLOAT",
      "test_castlike_FLOAT4E2M1_to_FLOAT16", "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT",
      "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT16", "test_castlike_FLOAT8E4M3FN_to_FLOAT",
      "test_castlike_FLOAT8E4M3FN_to_FLOAT16", "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT",
      "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT16", "test_castlike_FLOAT8E5M2_to_FLOAT",
      "test_castlike_FLOAT8E5M2_to_FLOAT16", "test_castlike_FLOAT_to_BFLOAT16",
      "test_castlike_FLOAT_to_FLOAT16", "test_castlike_FLOAT_to_FLOAT4E2M1",
      "test_castlike_FLOAT_to_FLOAT8E4M3FN", "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ",
      "test_castlike_FLOAT_to_FLOAT8E5M2", "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ",
      "test_castlike_FLOAT_to_INT2", "test_castlike_FLOAT_to_INT4", "test_castlike_FLOAT_to_UINT2",
      "test_castlike_FLOAT_to_UINT4", "test_castlike_INT2_to_FLOAT", "test_castlike_INT2_to_FLOAT16",
      "test_castlike_INT2_to_INT8", "test_castlike_INT4_to_FLOAT", "test_castlike_INT4_to_FLOAT16",
      "test_castlike_INT4_to_INT8", "test_castlike_UINT2_to_FLOAT", "test_castlike_UINT2_to_FLOAT16",
      "test_castlike_UINT2_to_UINT8", "test_castlike_UINT4_to_FLOAT", "test_castlike_UINT4_to_FLOAT16",
      "test_castlike_UINT4_to_UINT8", "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2",
      "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN", "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ",
      "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2", "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ",
      "test_causal_conv_with_state_fp16_expanded", "test_causal_conv_with_state_silu_fp16_expanded",
      "test_celu_bfloat16_expanded", "test_celu_float16_expanded", "test_einsum_batch_matmul_bfloat16",
      "test_einsum_sum_bfloat16", "test_einsum_transpose_bfloat16", "test_flexattention_fp16_expanded_ver26",
      "test_max_float16", "test_min_float16", "test_range_bfloat16_type_positive_delta",
      "test_range_float16_type_positive_delta", "test_reduce_max_bool_inputs", "test_reduce_min_bool_inputs"]),
    ("Resize beyond conv-net upsampling: cubic, antialias, half_pixel_symmetric, tf_crop_and_resize (a crop given "
     "by roi) and keep_aspect_ratio_policy not_larger / not_smaller (convc resizes nearest and linear)",
     r"mode 'cubic'|antialias=1|'half_pixel_symmetric'|'tf_crop_and_resize'|keep_aspect_ratio_policy '",
     ["test_resize_downsample_scales_cubic", "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside",
      "test_resize_downsample_scales_cubic_align_corners", "test_resize_downsample_scales_cubic_antialias",
      "test_resize_downsample_scales_linear_antialias",
      "test_resize_downsample_scales_linear_half_pixel_symmetric", "test_resize_downsample_sizes_cubic",
      "test_resize_downsample_sizes_cubic_antialias", "test_resize_downsample_sizes_linear_antialias",
      "test_resize_downsample_sizes_nearest_not_larger", "test_resize_downsample_sizes_nearest_not_smaller",
      "test_resize_tf_crop_and_resize", "test_resize_tf_crop_and_resize_axes_2_3",
      "test_resize_tf_crop_and_resize_axes_3_2", "test_resize_tf_crop_and_resize_extrapolation_value",
      "test_resize_upsample_scales_cubic", "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside",
      "test_resize_upsample_scales_cubic_align_corners", "test_resize_upsample_scales_cubic_asymmetric",
      "test_resize_upsample_scales_linear_half_pixel_symmetric", "test_resize_upsample_sizes_cubic",
      "test_resize_upsample_sizes_nearest_not_larger", "test_resize_upsample_sizes_nearest_not_smaller"]),
    ("expected data from onnx.reference, whose align_corners divides by the fractional input x scale; ONNX's "
     "formula, ONNX Runtime and PyTorch divide by the whole output length, as convc does",
     r"Mismatched elements", ["test_resize_downsample_scales_linear_align_corners"]),
    ("a negative Slice step (a reversed axis): convc's slice steps forward", r"step -\d+ on axis",
     ["test_slice_neg_steps"]),
    ("the crop's target shape is a run-time input (CenterCropPad's expansion): convc's shapes are static",
     r"must be a constant", ["test_center_crop_pad_crop_and_pad_expanded", "test_center_crop_pad_crop_axes_chw_expanded",
      "test_center_crop_pad_crop_axes_hwc_expanded", "test_center_crop_pad_crop_expanded",
      "test_center_crop_pad_crop_negative_axes_hwc_expanded", "test_center_crop_pad_pad_expanded"]),
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


@functools.lru_cache(maxsize=1)
def all_cases() -> tuple:
    """Every node test case of the onnx package, by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the generators of other ops warn about overflowing casts
        from onnx.backend.test.case.node import collect_testcases
        cases = collect_testcases(None)
    return tuple(sorted((c for c in cases if c.kind == "node" and c.model.graph.node), key=lambda c: c.name))


def select_cases(ops=OPS):
    """The node test cases whose every node is one of ``ops`` (None: all), by name."""
    return [c for c in all_cases() if ops is None or all(
        n.op_type in ops and n.domain in ("", "ai.onnx") for n in c.model.graph.node)]


def _snake(op: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()


@functools.lru_cache(maxsize=None)
def _op_names() -> dict:
    """snake_case -> ONNX op name, for every op of the default domain."""
    from onnx import defs
    return {_snake(s.name): s.name for s in defs.get_all_schemas_with_history() if s.domain == ""}


def case_op(case) -> str:
    """The op a case tests: its node's; for a multi-node case (a function's
    expansion, ``_expanded``) the function's, which onnx writes before the
    case's name in the nodes' outputs, else the op its name starts with."""
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    names = _op_names()
    known = set(names.values())
    for n in nodes:
        for o in n.output:
            head = o.split("_" + case.name, 1)[0] if "_" + case.name in o else None
            if head in known:
                return head
    stem = case.name[len("test_"):]
    found = [snake for snake in names if stem == snake or stem.startswith(snake + "_")
             or stem.startswith(snake.replace("_", "") + "_")]
    return names[max(found, key=len)] if found else nodes[0].op_type


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


def _check_outputs(got: list, expected, case) -> None:
    from onnx import numpy_helper

    assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
    for (oname, y), want in zip(got, expected):
        want = numpy_helper.to_array(want) if type(want).__name__ == "TensorProto" else np.asarray(want)
        assert y.shape == want.shape, f"output {oname}: shape {y.shape}, expected {want.shape}"
        assert y.dtype == want.dtype, f"output {oname}: dtype {y.dtype}, expected {want.dtype}"
        np.testing.assert_allclose(y, want, rtol=case.rtol, atol=case.atol, err_msg=f"output {oname}")


def _import(model, constants):
    from . import from_onnx
    from .validate import OnnxOpsetWarning

    with warnings.catch_warnings():      # (an opset newer than convc checked: known, and refused per op)
        warnings.simplefilter("ignore", OnnxOpsetWarning)
        return from_onnx(model, constants=constants)


def run_case(case, target: str = "c") -> None:
    """Import, compile and run one case; returns if it passes, else raises
    ConvcError (convc cannot take it) or AssertionError (wrong numbers)."""
    from ..api import compile as cc_compile
    from . import node_name

    for inputs, expected in case.data_sets:
        constants, feeds = static_bindings(case.model, inputs)
        g = _import(case.model, constants)
        mod = cc_compile(g, target=target)
        got = mod.run({node_name(n, "input"): a for n, a in feeds.items()})
        _check_outputs(list(got.items()), expected, case)


def _reason(e: Exception) -> str:
    from . import OnnxImportError

    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if isinstance(e, OnnxImportError):
        lines = lines[1:]                   # the header line names the model only
    return "; ".join(lines[:3]) or type(e).__name__


def outcome(case, target: str = "c") -> tuple[bool, str]:
    """(passed, reason): for an import error, every problem it lists."""
    try:
        run_case(case, target)
    except (ConvcError, AssertionError) as e:
        return False, _reason(e)
    return True, ""


# -- one module for many cases ------------------------------------------------------
def _mergeable(case) -> bool:
    onnx_attr_graph = (5, 10)       # AttributeProto.GRAPH, GRAPHS: subgraphs read outer names
    return len(case.data_sets) == 1 and not case.model.functions and not any(
        a.type in onnx_attr_graph for n in case.model.graph.node for a in n.attribute)


def group_key(case):
    """Cases with one key can share one model: the same op, opsets and form."""
    if not _mergeable(case):
        return (case_op(case), case.name)
    return (case_op(case), tuple(sorted((o.domain, o.version) for o in case.model.opset_import)))


def merge(cases):
    """One ONNX model holding every case's graph, each tensor and node
    renamed with the prefix ``c<k>_``: (model, constants, run-time feeds
    by convc input name, the number of outputs of each case)."""
    from onnx import helper
    from . import node_name

    graphs, constants, feeds, counts = [], {}, {}, []
    for k, case in enumerate(cases):
        p = f"c{k}_"

        def rn(t, p=p):
            return p + t if t else t

        m = case.model
        nodes = []
        for i, n in enumerate(m.graph.node):
            c = type(n)()
            c.CopyFrom(n)
            c.name = p + (n.name or f"n{i}")
            c.input[:] = [rn(t) for t in n.input]
            c.output[:] = [rn(t) for t in n.output]
            nodes.append(c)
        infos = []
        for group in (m.graph.input, m.graph.output, m.graph.initializer):
            renamed = []
            for v in group:
                c = type(v)()
                c.CopyFrom(v)
                c.name = rn(v.name)
                renamed.append(c)
            infos.append(renamed)
        graphs.append((nodes, *infos))
        inputs, _ = case.data_sets[0]
        const, feed = static_bindings(m, inputs)
        constants.update({rn(n): a for n, a in const.items()})
        feeds.update({node_name(rn(n), "input"): a for n, a in feed.items()})
        counts.append(len(m.graph.output))
    g = helper.make_graph([n for x in graphs for n in x[0]], "conformance", [i for x in graphs for i in x[1]],
                          [o for x in graphs for o in x[2]], [t for x in graphs for t in x[3]])
    model = helper.make_model(g, opset_imports=list(cases[0].model.opset_import))
    model.ir_version = max(c.model.ir_version for c in cases)
    return model, constants, feeds, counts


def run_group(cases, target: str = "c") -> dict[str, tuple[bool, str]]:
    """(passed, reason) of each case, the cases compiled as ONE module (see
    :func:`merge`); cases the merged import names as failing, and every case
    of a group whose module fails to compile, run or match, are run alone (so
    each failure names its own case and reason)."""
    from ..api import compile as cc_compile
    from . import OnnxImportError

    if len(cases) == 1:
        return {cases[0].name: outcome(cases[0], target)}
    model, constants, feeds, counts = merge(cases)
    try:
        g = _import(model, constants)
    except OnnxImportError as e:
        named = {int(k) for _, name, _ in e.problems for k in re.findall(r"\bc(\d+)_", name)}
        if not named or len(named) == len(cases):
            return {c.name: outcome(c, target) for c in cases}
        out = {cases[k].name: outcome(cases[k], target) for k in sorted(named)}
        out.update(run_group([c for k, c in enumerate(cases) if k not in named], target))
        return out
    except Exception:       # noqa: BLE001 -- anything else: each case alone says what
        return {c.name: outcome(c, target) for c in cases}
    try:
        got = list(cc_compile(g, target=target).run(feeds).items())
    except Exception:       # noqa: BLE001
        return {c.name: outcome(c, target) for c in cases}
    out, start = {}, 0
    for case, n in zip(cases, counts):
        try:
            _check_outputs(got[start:start + n], case.data_sets[0][1], case)
            out[case.name] = (True, "")
        except AssertionError:
            out[case.name] = outcome(case, target)
        start += n
    return out


def run_cases(cases, target: str = "c", progress=None) -> dict[str, tuple[bool, str]]:
    """(passed, reason) of every case, one module per :func:`group_key`."""
    groups: dict = {}
    for c in cases:
        groups.setdefault(group_key(c), []).append(c)
    out = {}
    for key, group in groups.items():
        out.update(run_group(group, target))
        if progress:
            progress(key, len(out))
    return out


def _counts(cases, results) -> dict[str, list[int]]:
    """op -> [passed, cases] (see :func:`case_op`)."""
    by_op: dict[str, list[int]] = {}
    for c in cases:
        entry = by_op.setdefault(case_op(c), [0, 0])
        entry[0] += results[c.name][0]
        entry[1] += 1
    return by_op


def _fraction(p: int, t: int) -> str:
    return f"{p} of {t} ({100 * p / t:.1f}%)" if t else "0 of 0"


def report(target: str = "c", progress=None) -> str:
    """The conformance section as Markdown: every node case of the onnx
    package run on ``target`` (one module per group of cases)."""
    import onnx

    cases = select_cases(None)
    results = run_cases(cases, target, progress)
    claimed = [c for c in select_cases() if c.name in results]
    conv_net = [c for c in cases if case_op(c) in CONV_NET_OPS]
    n_pass = {what: sum(results[c.name][0] for c in group) for what, group in
              (("claimed", claimed), ("all", cases), ("conv", conv_net))}
    lines = [
        "### Conformance",
        "",
        f"The backend node tests of onnx {onnx.__version__} ({len(cases)} cases), run on the `{target}` target:",
        "",
        f"* the cases of the {len(OPS)} ops convc claims (every node of the case one of them): "
        f"**{n_pass['claimed']} of {len(claimed)} pass**; every other one is listed below with the reason it "
        "cannot pass;",
        f"* the cases of the ops of conv nets ({len(CONV_NET_OPS)} ops: the conv-net model zoos' and the glue "
        f"exporters write around them; `CONV_NET_OPS`): **{_fraction(n_pass['conv'], len(conv_net))}**;",
        f"* all node cases: **{_fraction(n_pass['all'], len(cases))}**.",
        "",
        f"Regenerate this section with `python -m convc.onnx.conformance --target {target} --write FILE`; "
        "`tests/test_onnx_import.py` runs every claimed case on C and OpenCL (one module per op and opset). "
        "Inputs that convc needs at compile time (Reshape's shape, Pad's pads, Clip's bounds, Gather's indices, "
        "the quantized ops' scales and zero points, ...: `STATIC_INPUTS`) are bound as constants from the case's "
        "data; all others are fed at run time. Outputs must match within each case's tolerance (onnx's: rtol "
        "1e-3, atol 1e-7).",
        "",
        "The claimed cases by the op they test (a function's expansion, `_expanded`, under its function):",
        "",
        "| op | pass | cases |",
        "|---|---:|---:|",
    ]
    lines += [f"| {op} | {p} | {t} |" for op, (p, t) in sorted(_counts(claimed, results).items())]
    failing = {c.name: results[c.name][1] for c in claimed if not results[c.name][0]}
    if failing:
        lines += ["", f"The {len(failing)} claimed cases that do not pass, and why:", "", "| reason | cases |",
                  "|---|---|"]
        for why, pattern, names in CANNOT_PASS:
            shown = [n for n in names if n in failing and re.search(pattern, failing[n])]
            if shown:
                lines.append(f"| {why} | {', '.join(f'`{n}`' for n in sorted(shown))} |")
        for n, error in failing.items():        # not (or not so) expected: convc's own words
            if n not in EXPECTED_FAILURES or not re.search(EXPECTED_FAILURES[n][1], error):
                lines.append(f"| {error.replace('|', '/')} | `{n}` |")
    claimed_names = {c.name for c in claimed}
    others = _counts([c for c in cases if c.name not in claimed_names], results)
    missing = {n.op_type for c in cases if c.name not in claimed_names for n in c.model.graph.node
               if n.op_type not in OPS}
    lines += ["", f"The other {sum(t for _, t in others.values())} cases (each has a node of an op convc does not "
              f"claim: {len(missing)} such ops), by the op they test, pass / cases; conv-net ops in bold:", ""]
    lines.append(", ".join(f"{'**' + op + '**' if op in CONV_NET_OPS else op} {p}/{t}"
                           for op, (p, t) in sorted(others.items())) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convc.onnx.conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="c", help="convc target (default: c)")
    p.add_argument("--write", metavar="FILE", help="write the Markdown to FILE instead of printing it")
    args = p.parse_args(argv)
    text = report(args.target, progress=lambda key, n: print(f"  {key[0]}: {n} cases run", file=sys.stderr))
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(next(line for line in text.splitlines() if " pass**" in line))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
