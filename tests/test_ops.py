"""Activations, broadcasting arithmetic, concat/reshape/flatten, dense, matmul
and softmax against PyTorch, on the "numpy" and "c" targets.

Every case is one or more inputs and one output of ONE graph (compiled once
per target); each case is still its own test item, named after it. Expected
values come from torch on the same arrays.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers

assert_close = partial(helpers.assert_close, check_dtype=True)   # results keep their dtype too

TARGETS = helpers.TARGETS


# -- local helpers -------------------------------------------------------------

def T(a):
    return torch.from_numpy(np.array(a, order="C", copy=True))     # (ascontiguousarray makes 0-d 1-d)


class Ctx:
    """Builds the inputs of one case: names are unique per case."""

    def __init__(self, g, rng, prefix, feeds):
        self.g, self.rng, self.prefix, self.feeds, self.n = g, rng, prefix, feeds, 0

    def input(self, shape, dtype="float32", low=-2.0, high=2.0):
        name = f"{self.prefix}_in{self.n}"
        self.n += 1
        a = np.asarray(self.rng.uniform(low, high, size=shape), dtype=dtype)
        self.feeds[name] = a
        return self.g.input(name, shape, dtype), a

    def array(self, shape, dtype="float32", low=-2.0, high=2.0):
        return self.rng.uniform(low, high, size=shape).astype(dtype)


CASES: list[tuple[str, object, str]] = []   # (id, builder(ctx) -> (Value, expected), dtype)


def case(cid, dtype="float32"):
    def deco(fn):
        CASES.append((cid, fn, dtype))
        return fn
    return deco


# -- activations ------------------------------------------------------------------
for _dt in ("float32", "float64"):
    _s = "" if _dt == "float32" else "-f64"

    @case(f"relu{_s}", _dt)
    def _(c, dt=_dt):
        x, a = c.input((2, 3, 4, 5), dt)
        return cc.relu(x), F.relu(T(a)).numpy()

    @case(f"sigmoid{_s}", _dt)
    def _(c, dt=_dt):
        x, a = c.input((3, 7, 5), dt, -20, 20)
        return cc.sigmoid(x), torch.sigmoid(T(a)).numpy()

    @case(f"tanh{_s}", _dt)
    def _(c, dt=_dt):
        x, a = c.input((4, 33), dt, -6, 6)
        return cc.tanh(x), torch.tanh(T(a)).numpy()

    @case(f"leaky_relu-default{_s}", _dt)
    def _(c, dt=_dt):
        x, a = c.input((2, 50), dt)
        return cc.leaky_relu(x), F.leaky_relu(T(a)).numpy()       # both default to 0.01

for _slope in (0.2, 0.0, 1.7, -0.5, 1e-3 / 3):
    @case(f"leaky_relu-slope{_slope:g}")
    def _(c, slope=_slope):
        x, a = c.input((3, 4, 5))
        return cc.leaky_relu(x, slope), F.leaky_relu(T(a), slope).numpy()


@case("leaky_relu-slope1e-3/3-f64", "float64")
def _(c):
    x, a = c.input((3, 40), "float64")
    return cc.leaky_relu(x, 1e-3 / 3), F.leaky_relu(T(a), 1e-3 / 3).numpy()


# -- binary arithmetic with broadcasting ---------------------------------------------
BINARY = {"add": (cc.add, torch.add), "sub": (cc.sub, torch.sub), "mul": (cc.mul, torch.mul),
          "div": (cc.div, torch.div)}
SHAPE_PAIRS = [
    ((2, 3, 4, 5), (2, 3, 4, 5)),
    ((3, 1, 1), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (3, 1, 1)),
    ((2, 3, 4, 5), (5,)),
    ((4, 1), (3,)),            # -> (4, 3): both sides broadcast
    ((1, 3, 1, 5), (2, 1, 4, 1)),
    ((2, 1, 4), (1, 3, 1)),
    ((), (2, 3)),              # 0-d tensor operand
    ((6,), (1, 1, 1, 6)),      # rank-different, right-aligned
    ((2, 3, 1, 5), (4, 1)),
]
for _op in BINARY:
    for _i, (_sa, _sb) in enumerate(SHAPE_PAIRS):
        _id = f"{_op}-{'x'.join(map(str, _sa)) or 'scalar'}-vs-{'x'.join(map(str, _sb))}"

        @case(_id)
        def _(c, op=_op, sa=_sa, sb=_sb):
            x, a = c.input(sa)
            y, b = c.input(sb, low=0.5, high=2.0) if op == "div" else c.input(sb)
            ours, theirs = BINARY[op]
            return ours(x, y), theirs(T(a), T(b)).numpy()

# Python numbers and numpy arrays as operands
for _op in BINARY:
    @case(f"{_op}-value-number")
    def _(c, op=_op):
        x, a = c.input((2, 3, 4))
        ours, theirs = BINARY[op]
        return ours(x, 2.5), theirs(T(a), 2.5).numpy()

    @case(f"{_op}-number-value")
    def _(c, op=_op):
        x, a = c.input((2, 3, 4), low=0.5, high=3.0)
        ours, theirs = BINARY[op]
        return ours(3.0, x), theirs(torch.tensor(3.0), T(a)).numpy()


@case("add-int-number")
def _(c):
    x, a = c.input((3, 4))
    return cc.add(x, 2), (T(a) + 2).numpy()


@case("add-0d-tensor-number")
def _(c):
    x, a = c.input(())
    return cc.add(x, 2.0), (T(a) + 2.0).numpy()


@case("mul-0d-param-broadcast")
def _(c):
    x, a = c.input((2, 3))
    p = c.g.param(f"{c.prefix}_p", np.array(-1.5, np.float32))
    return cc.mul(x, p), (T(a) * -1.5).numpy()


@case("mul-numpy-array-broadcast")
def _(c):
    x, a = c.input((2, 3, 4, 5))
    w = c.array((3, 1, 1))
    return cc.mul(x, w), (T(a) * T(w)).numpy()


@case("sub-numpy-array-left")
def _(c):
    x, a = c.input((2, 5))
    w = c.array((5,))
    return cc.sub(w, x), (T(w) - T(a)).numpy()


@case("add-same-value-twice")
def _(c):
    x, a = c.input((3, 5))
    return cc.add(x, x), (T(a) + T(a)).numpy()


@case("chain-f64", "float64")
def _(c):
    x, a = c.input((2, 3, 4, 5), "float64")
    y, b = c.input((3, 1, 1), "float64", 0.5, 2)
    out = cc.div(cc.mul(cc.sub(cc.add(x, 1.0), y), x), y)
    ta, tb = T(a), T(b)
    return out, ((ta + 1.0 - tb) * ta / tb).numpy()


for _op in BINARY:
    @case(f"{_op}-broadcast-f64", "float64")
    def _(c, op=_op):
        x, a = c.input((2, 1, 4, 5), "float64")
        y, b = c.input((3, 1, 1), "float64", 0.5, 2)
        ours, theirs = BINARY[op]
        return ours(x, y), theirs(T(a), T(b)).numpy()


# -- concat -------------------------------------------------------------------------
CONCATS = [
    (1, [(2, 3, 4, 5), (2, 1, 4, 5)]),
    (1, [(2, 1, 4, 5), (2, 2, 4, 5), (2, 3, 4, 5), (2, 1, 4, 5)]),
    (0, [(1, 3, 4), (2, 3, 4), (3, 3, 4)]),
    (2, [(2, 3, 1, 5), (2, 3, 4, 5)]),
    (3, [(2, 3, 4, 1), (2, 3, 4, 2), (2, 3, 4, 3)]),
    (-1, [(2, 3, 4), (2, 3, 2)]),
    (-2, [(2, 5, 3), (2, 1, 3), (2, 2, 3), (2, 4, 3)]),
    (0, [(4,), (7,)]),
]
for _ax, _shapes in CONCATS:
    @case(f"concat-axis{_ax}-{len(_shapes)}in-{'_'.join('x'.join(map(str, s)) for s in _shapes)}")
    def _(c, ax=_ax, shapes=_shapes):
        pairs = [c.input(s) for s in shapes]
        return cc.concat([p[0] for p in pairs], axis=ax), torch.cat([T(p[1]) for p in pairs], dim=ax).numpy()


@case("concat-f64-with-itself", "float64")
def _(c):
    x, a = c.input((2, 3, 2), "float64")
    return cc.concat([x, x, x], axis=1), torch.cat([T(a)] * 3, dim=1).numpy()


@case("concat-default-axis-is-channels")
def _(c):
    x, a = c.input((2, 2, 3, 3))
    y, b = c.input((2, 1, 3, 3))
    return cc.concat([x, y]), torch.cat([T(a), T(b)], dim=1).numpy()


# -- reshape / flatten -----------------------------------------------------------------
RESHAPES = [((2, 3, 4, 5), (-1, 5)), ((2, 3, 4, 5), (6, -1)), ((2, 3, 4, 5), (120,)),
            ((2, 3, 4, 5), (2, -1, 2, 5)), ((6, 4), (2, 3, 2, 2)), ((2, 12), (-1,)), ((1, 1, 5), (5, 1))]
for _src, _dst in RESHAPES:
    @case(f"reshape-{'x'.join(map(str, _src))}-to-{'x'.join(map(str, _dst))}")
    def _(c, src=_src, dst=_dst):
        x, a = c.input(src)
        return cc.reshape(x, dst), torch.reshape(T(a), dst).numpy()


@case("reshape-then-relu-f64", "float64")
def _(c):
    x, a = c.input((2, 3, 4), "float64")
    return cc.relu(cc.reshape(x, (4, -1))), F.relu(T(a).reshape(4, -1)).numpy()


FLATTENS = [(1, -1), (0, -1), (1, 2), (2, 3), (0, 0), (-3, -2), (3, 3), (0, 2)]
for _s, _e in FLATTENS:
    @case(f"flatten-{_s}-{_e}")
    def _(c, s=_s, e=_e):
        x, a = c.input((2, 3, 4, 5))
        return cc.flatten(x, s, e), torch.flatten(T(a), s, e).numpy()


@case("flatten-default")
def _(c):
    x, a = c.input((3, 2, 2, 2))
    return cc.flatten(x), torch.flatten(T(a), 1).numpy()


# -- dense -------------------------------------------------------------------------------
for _dt in ("float32", "float64"):
    for _xs in ((4, 12), (2, 3, 12), (1, 12)):
        for _bias in (True, False):
            @case(f"dense-x{'x'.join(map(str, _xs))}-{'bias' if _bias else 'nobias'}"
                  f"{'-f64' if _dt == 'float64' else ''}", _dt)
            def _(c, xs=_xs, bias=_bias, dt=_dt):
                x, a = c.input(xs, dt)
                w = c.array((7, 12), dt)
                b = c.array((7,), dt) if bias else None
                want = F.linear(T(a), T(w), T(b) if bias else None).numpy()
                return cc.dense(x, w, b), want


@case("dense-weight-as-param-value")
def _(c):
    x, a = c.input((3, 5))
    w = c.g.param(f"{c.prefix}_w", c.array((2, 5)))
    b = c.g.param(f"{c.prefix}_b", c.array((2,)))
    want = F.linear(T(a), T(c.g.node(w.name)["value"]), T(c.g.node(b.name)["value"])).numpy()
    return cc.dense(x, w, b), want


# -- matmul --------------------------------------------------------------------------------
MATMULS = [((3, 4), (4, 5)), ((1, 7), (7, 1)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)),
           ((3, 4), (2, 4, 5)), ((2, 1, 3, 4), (1, 3, 4, 2)), ((1, 3, 3, 4), (2, 1, 4, 6)),
           ((2, 3, 2, 5), (5, 3))]
for _dt in ("float32", "float64"):
    for _sa, _sb in MATMULS:
        @case(f"matmul-{'x'.join(map(str, _sa))}@{'x'.join(map(str, _sb))}{'-f64' if _dt == 'float64' else ''}",
              _dt)
        def _(c, sa=_sa, sb=_sb, dt=_dt):
            x, a = c.input(sa, dt)
            y, b = c.input(sb, dt)
            return cc.matmul(x, y), torch.matmul(T(a), T(b)).numpy()


# a used transposed (stored (..., K, M)), including shapes that fill the GEMM's register tiles
for _dt in ("float32", "float64"):
    for _sa, _sb in [((4, 3), (4, 5)), ((2, 7, 3), (2, 7, 1)), ((40, 37), (40, 70)), ((2, 1, 9, 13), (3, 9, 33))]:
        @case(f"matmul-aT-{'x'.join(map(str, _sa))}@{'x'.join(map(str, _sb))}{'-f64' if _dt == 'float64' else ''}",
              _dt)
        def _(c, sa=_sa, sb=_sb, dt=_dt):
            x, a = c.input(sa, dt)
            y, b = c.input(sb, dt)
            return cc.matmul(x, y, transpose_a=True), torch.matmul(T(a).transpose(-1, -2), T(b)).numpy()


@case("matmul-with-constant-array")
def _(c):
    x, a = c.input((2, 3, 4))
    w = c.array((4, 2))
    return cc.matmul(x, w), torch.matmul(T(a), T(w)).numpy()


# -- softmax --------------------------------------------------------------------------------
for _dt in ("float32", "float64"):
    for _shape, _axis in (((2, 3, 4, 5), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), -1),
                          ((2, 3, 4, 5), -3), ((4, 10), 1), ((4, 10), 0), ((7,), 0)):
        @case(f"softmax-{'x'.join(map(str, _shape))}-axis{_axis}{'-f64' if _dt == 'float64' else ''}", _dt)
        def _(c, shape=_shape, axis=_axis, dt=_dt):
            x, a = c.input(shape, dt, -5, 5)
            return cc.softmax(x, axis), torch.softmax(T(a), dim=axis).numpy()


@case("softmax-large-logits-stable")
def _(c):
    x, a = c.input((3, 8), "float32", -300, 300)     # exp would overflow without the max shift
    return cc.softmax(x), torch.softmax(T(a), dim=-1).numpy()


@case("softmax-default-axis-last")
def _(c):
    x, a = c.input((2, 3, 4))
    return cc.softmax(x), torch.softmax(T(a), dim=-1).numpy()


# -- one graph for every case ----------------------------------------------------------------
IDS = [cid for cid, _, _ in CASES]
assert len(set(IDS)) == len(IDS), "case ids must be unique"


@pytest.fixture(scope="module")
def suite():
    rng = np.random.default_rng(7)
    g = cc.Graph("ops")
    feeds, expected = {}, {}
    for i, (cid, build, dt) in enumerate(CASES):
        value, want = build(Ctx(g, rng, f"c{i}", feeds))
        assert str(want.dtype) == dt, f"{cid}: torch gave {want.dtype}"
        g.output(value, f"o{i}")
        expected[f"o{i}"] = want
    results = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return results, expected


def _tol(cid, dt):
    if dt == "float64":
        return 1e-12, 1e-13
    return (1e-5, 2e-6) if cid.startswith(("dense", "matmul")) else (1e-5, 1e-7)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("idx", range(len(CASES)), ids=IDS)
def test_op_matches_torch(suite, target, idx):
    results, expected = suite
    cid, _, dt = CASES[idx]
    rtol, atol = _tol(cid, dt)
    assert_close(results[target][f"o{idx}"], expected[f"o{idx}"], rtol, atol, f"{cid} on target {target}")


def test_leaky_relu_slope_is_in_attributes_and_printed():
    g = cc.Graph("lr")
    x = g.input("x", (2, 2))
    y = cc.leaky_relu(x, 0.25, name="lr")
    g.output(y)
    assert g.node("lr")["attrs"]["negative_slope"] == 0.25
    assert "negative_slope=0.25" in str(g)


def test_scalar_operand_becomes_a_constant_of_the_same_dtype():
    g = cc.Graph("s")
    x = g.input("x", (2, 3), "float64")
    y = cc.add(x, 2.0)
    assert y.dtype == "float64" and y.shape == (2, 3)
    const = [n for n in g.inputs_of(y.name) if n != "x"]
    assert len(const) == 1 and g.node(const[0])["op"] == "param"
    assert g.node(const[0])["value"].size == 1 and float(g.node(const[0])["value"].reshape(())) == 2.0


def test_zero_d_operand_plus_number_stays_zero_d():
    g = cc.Graph("s")
    s = g.input("s", ())
    p = g.param("p", np.array(3.0, np.float32))
    assert p.shape == (), f"0-d param has shape {p.shape}"
    y = cc.add(s, 2.0)
    assert y.shape == tuple((torch.tensor(1.0) + 2.0).shape) == (), f"0-d + number has shape {y.shape}"


# -- validation ------------------------------------------------------------------------------
def _graph():
    g = cc.Graph("bad")
    return g, g.input("x", (2, 3, 4, 5)), g.input("y", (2, 4)), g.input("z", (4, 3))


INVALID = [
    ("add-no-broadcast", lambda x, y, z: cc.add(x, y, name="n"), "add", "broadcast"),
    ("sub-no-broadcast", lambda x, y, z: cc.sub(y, z, name="n"), "sub", "broadcast"),
    ("mul-no-broadcast", lambda x, y, z: cc.mul(x, np.ones((3, 5), np.float32), name="n"), "mul", "broadcast"),
    ("div-no-broadcast", lambda x, y, z: cc.div(z, y, name="n"), "div", "broadcast"),
    ("concat-mismatch", lambda x, y, z: cc.concat([y, z], axis=0, name="n"), "concat", "must match except on axis"),
    ("concat-rank", lambda x, y, z: cc.concat([x, y], axis=1, name="n"), "concat", "must match except on axis"),
    ("concat-axis", lambda x, y, z: cc.concat([y, y], axis=2, name="n"), "concat", "out of range"),
    ("concat-neg-axis", lambda x, y, z: cc.concat([y, y], axis=-3, name="n"), "concat", "out of range"),
    ("reshape-count", lambda x, y, z: cc.reshape(x, (7, -1), name="n"), "reshape", "cannot reshape"),
    ("reshape-size", lambda x, y, z: cc.reshape(x, (2, 3, 4, 4), name="n"), "reshape", "cannot reshape"),
    ("reshape-two-minus-one", lambda x, y, z: cc.reshape(x, (-1, -1), name="n"), "reshape", "one -1"),
    ("reshape-zero", lambda x, y, z: cc.reshape(x, (0, 120), name="n"), "reshape", "one -1"),
    ("flatten-start-after-end", lambda x, y, z: cc.flatten(x, 3, 1, name="n"), "flatten", "after end_dim"),
    ("flatten-axis", lambda x, y, z: cc.flatten(x, 4, name="n"), "flatten", "out of range"),
    ("dense-weight", lambda x, y, z: cc.dense(y, np.ones((3, 5), np.float32), name="n"), "dense",
     "weight must be (out_features, in_features=4)"),
    ("dense-weight-rank", lambda x, y, z: cc.dense(y, np.ones((4,), np.float32), name="n"), "dense",
     "weight must be"),
    ("dense-bias", lambda x, y, z: cc.dense(y, np.ones((3, 4), np.float32), np.ones(4, np.float32), name="n"),
     "dense", "bias must be (3,)"),
    ("matmul-inner", lambda x, y, z: cc.matmul(y, y, name="n"), "matmul", "inner dims differ"),
    ("matmul-batch", lambda x, y, z: cc.matmul(x, np.ones((2, 5, 2), np.float32), name="n"), "matmul",
     "do not broadcast"),
    ("matmul-rank1", lambda x, y, z: cc.matmul(y, np.ones(4, np.float32), name="n"), "matmul", "rank >= 2"),
    ("softmax-axis", lambda x, y, z: cc.softmax(x, 4, name="n"), "softmax", "out of range"),
    ("softmax-neg-axis", lambda x, y, z: cc.softmax(y, -3, name="n"), "softmax", "out of range"),
    ("leaky-slope", lambda x, y, z: cc.leaky_relu(y, "steep", name="n"), "leaky_relu", "negative_slope"),
    ("dtype-mix", lambda x, y, z: cc.add(y, y.graph.input("d", (2, 4), "float64"), name="n"), "add",
     "share one dtype"),
    ("relu-int", lambda x, y, z: cc.relu(y.graph.input("i", (2,), "int64"), name="n"), "relu", "float"),
]


@pytest.mark.parametrize("builder, op, rule", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_ops_raise_validation_error(builder, op, rule):
    g, x, y, z = _graph()
    with pytest.raises(cc.ValidationError) as ei:
        builder(x, y, z)
    msg = str(ei.value)
    assert isinstance(ei.value, cc.ConvcError)
    assert msg.startswith(f"node 'n' ({op})"), msg
    assert rule in msg, msg
    assert "n" not in g.nx, "a rejected node must not be added"


def test_error_names_auto_generated_node_and_shapes():
    g, x, y, z = _graph()
    with pytest.raises(cc.ValidationError) as ei:
        cc.matmul(y, y)
    msg = str(ei.value)
    assert "'matmul_" in msg and "(2, 4)" in msg, msg
