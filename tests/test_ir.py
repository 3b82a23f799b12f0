"""The IR: Graph/Value basics, the text printer, Graphviz output, the verifier,
GraphError cases, float64/int64 end to end on the C target, and properties
of the generated C source (deterministic, banner, one function per node)."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.codegen.c import generate


def small_net(dtype="float32", seed=0):
    """x (2,1,6,6) -> conv(2 filters, 3x3, stride 2, pad 1) -> relu -> max_pool 2 ->
    flatten -> dense(3) ; also outputs the relu."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("net")
    x = g.input("x", (2, 1, 6, 6), dtype)
    w = g.param("w", rng.standard_normal((2, 1, 3, 3)).astype(dtype))
    c = cc.conv(x, w, stride=2, padding=1, name="c1")
    r = cc.relu(c, name="r1")
    m = cc.max_pool(r, 2, name="mp")
    f = cc.flatten(m, name="fl")
    d = cc.dense(f, g.param("fw", rng.standard_normal((3, 2)).astype(dtype)),
                 g.param("fb", rng.standard_normal(3).astype(dtype)), name="fc")
    g.output(d, "y")
    g.output(r, "feat")
    return g


# -- Graph / Value basics ---------------------------------------------------------------
def test_value_shapes_dtypes_and_ops():
    g = cc.Graph("basics")
    x = g.input("x", (1, 3, 10, 8))
    assert (x.shape, x.dtype, x.ndim, x.op, x.name) == ((1, 3, 10, 8), "float32", 4, "input", "x")
    w = g.param("w", np.zeros((4, 3, 3, 3), np.float64))
    assert w.dtype == "float64" and w.op == "param" and w.shape == (4, 3, 3, 3)
    w32 = g.param("w32", np.zeros((4, 3, 3, 3)), dtype="float32")
    assert w32.dtype == "float32"
    # (10 + 2 - 3)//2 + 1 = 5, (8 + 2 - 3)//2 + 1 = 4
    y = cc.conv(x, w32, stride=2, padding=1)
    assert y.shape == (1, 4, 5, 4) and y.dtype == "float32" and y.op == "conv"
    assert y.name.startswith("conv")
    assert cc.relu(y).shape == y.shape
    assert g.value("x") == x and x != y and hash(g.value("x")) == hash(x)
    assert "x" in repr(x) and "float32[1,3,10,8]" in repr(x)
    assert isinstance(x.type, cc.TensorType) and x.type.size == 240 and x.type.nbytes == 960
    assert g.input_names == ["x"] and g.param_names == ["w", "w32"]
    assert g.inputs_of(y.name) == ["x", "w32"]


def test_param_value_is_copied():
    g = cc.Graph("copy")
    a = np.ones((2, 2), np.float32)
    p = g.param("p", a)
    a[:] = 5
    assert np.all(g.node(p.name)["value"] == 1)


def test_auto_names_are_unique():
    g = cc.Graph("names")
    x = g.input("x", (1, 4))
    names = [cc.relu(x).name for _ in range(5)]
    assert len(set(names)) == 5


# -- printer -------------------------------------------------------------------------------
def test_print_one_line_per_node_with_op_attrs_and_shape():
    g = small_net()
    text = str(g)
    lines = text.splitlines()
    node_lines = [ln.strip() for ln in lines if ln.strip().startswith("%")]
    assert len(node_lines) == g.nx.number_of_nodes() == 9
    by_node = {re.match(r"%([\w.\-]+)", ln).group(1): ln for ln in node_lines}
    assert set(by_node) == set(g.nx.nodes)
    # specific lines, spaces ignored
    squash = {k: v.replace(" ", "") for k, v in by_node.items()}
    assert squash["x"] == "%x=input():float32[2,1,6,6]"
    assert squash["r1"] == "%r1=relu(%c1):float32[2,2,3,3]"
    conv = squash["c1"]
    assert conv.startswith("%c1=conv(%x,%w,") and conv.endswith(":float32[2,2,3,3]")
    for attr in ("stride=(2,2)", "padding=((1,1),(1,1))", "dilation=(1,1)", "groups=1", "flip=False"):
        assert attr in conv, (attr, conv)
    assert "kernel_size=(2,2)" in squash["mp"] and squash["mp"].endswith(":float32[2,2,1,1]")
    assert "start_dim=1" in squash["fl"] and "end_dim=3" in squash["fl"]
    assert squash["fc"] == "%fc=dense(%fl,%fw,%fb):float32[2,3]"
    # outputs, and every node line follows its inputs (printed in schedule order)
    assert "output y = %fc" in text and "output feat = %r1" in text
    order = [re.match(r"%([\w.\-]+)", ln).group(1) for ln in node_lines]
    for n in order:
        for i in g.inputs_of(n):
            assert order.index(i) < order.index(n)
    assert repr(g) == text


# -- Graphviz ----------------------------------------------------------------------------------
def test_to_dot_has_every_node_and_edge():
    g = small_net()
    dot = g.to_dot()
    assert dot.lstrip().startswith("digraph") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    declared = set(re.findall(r'^\s*"([^"]+)"\s*\[', dot, re.M))
    assert set(g.nx.nodes) <= declared
    edges = set(re.findall(r'^\s*"([^"]+)"\s*->\s*"([^"]+)"', dot, re.M))
    want = {(u, v) for u, v in g.nx.edges()}
    assert want <= edges, want - edges
    # labels carry op and shape
    assert re.search(r'"c1"\s*\[label="c1\\nconv\\nfloat32\[2,2,3,3\]"', dot), dot
    # outputs shown as well
    assert ("fc", "out:y") in edges and ("r1", "out:feat") in edges


def test_to_dot_keeps_parallel_edges_of_a_value_used_twice():
    g = cc.Graph("twice")
    x = g.input("x", (2, 2))
    g.output(cc.mul(x, x, name="sq"))
    slots = re.findall(r'"x"\s*->\s*"sq"\s*\[label="(\d)"\]', g.to_dot())
    assert sorted(slots) == ["0", "1"]


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_to_dot_is_accepted_by_graphviz():
    proc = subprocess.run(["dot", "-Tsvg"], input=small_net().to_dot(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in proc.stdout


# -- verifier ---------------------------------------------------------------------------------
def test_verify_passes_on_good_graphs():
    g = small_net()
    assert g.verify() is g
    g64 = small_net("float64")
    assert g64.verify() is g64


def test_verify_rejects_graph_without_outputs():
    g = cc.Graph("noout")
    cc.relu(g.input("x", (2,)))
    with pytest.raises(cc.GraphError, match="no outputs"):
        g.verify()
    with pytest.raises(cc.GraphError):
        cc.compile(g, target="numpy")


def test_verify_rejects_a_cycle_and_a_stale_type():
    g = small_net()
    g.nx.add_edge("fc", "c1", key=3, slot=3)      # tamper: fc feeds c1
    with pytest.raises(cc.GraphError, match="cycle"):
        g.verify()
    g = small_net()
    from convc.ir import TensorType
    g.nx.nodes["r1"]["type"] = TensorType((2, 2, 3, 4))
    with pytest.raises(cc.GraphError, match="r1"):
        g.verify()


# -- GraphError ----------------------------------------------------------------------------------
def test_duplicate_node_names_raise():
    g = cc.Graph("dup")
    x = g.input("x", (1, 2))
    with pytest.raises(cc.GraphError, match="'x'"):
        g.input("x", (1, 2))
    with pytest.raises(cc.GraphError, match="'x'"):
        g.param("x", np.zeros(2, np.float32))
    cc.relu(x, name="r")
    with pytest.raises(cc.GraphError, match="'r'"):
        cc.relu(x, name="r")
    with pytest.raises(cc.GraphError, match="'r'"):
        g.input("r", (3,))
    assert [n for n in g.nx.nodes] == ["x", "r"]


def test_bad_names_shapes_and_dtypes_raise():
    with pytest.raises(cc.GraphError):
        cc.Graph("has space")
    g = cc.Graph("bad")
    for bad in ("1x", "a b", "", "x;y"):
        with pytest.raises(cc.GraphError):
            g.input(bad, (1,))
    with pytest.raises(cc.GraphError):
        g.input("z", (1, 0, 3))
    with pytest.raises(cc.GraphError):
        g.input("z", 5)
    with pytest.raises(cc.GraphError, match="float16"):
        g.input("z", (2,), "float16")
    x = g.input("x", (2,))
    with pytest.raises(cc.GraphError):
        g.output(x, "not-an-identifier")


def test_values_from_another_graph_raise():
    g1, g2 = cc.Graph("one"), cc.Graph("two")
    x1 = g1.input("x", (1, 1, 4, 4))
    x2 = g2.input("x", (1, 1, 4, 4))
    w2 = g2.param("w", np.ones((1, 1, 3, 3), np.float32))
    with pytest.raises(cc.GraphError, match="'two'"):
        cc.add(x1, x2)
    with pytest.raises(cc.GraphError):
        cc.conv(x1, w2)
    with pytest.raises(cc.GraphError):
        cc.concat([x1, x2])
    with pytest.raises(cc.GraphError):
        cc.matmul(x1, x2)
    with pytest.raises(cc.GraphError):
        g1.output(x2)
    assert list(g1.nx.nodes) == ["x"] and not g1.outputs


def test_output_name_reuse_raises():
    g = cc.Graph("outs")
    x = g.input("x", (2,))
    a, b = cc.relu(x), cc.tanh(x)
    g.output(a, "y")
    with pytest.raises(cc.GraphError, match="'y'"):
        g.output(b, "y")
    with pytest.raises(cc.GraphError, match="'y'"):
        g.output(a, "y")
    with pytest.raises(cc.GraphError, match="'x'"):
        g.output(b, "x")                 # the name of an input
    assert g.outputs == {"y": a.name}
    g.output(b)                          # default name: the node's name
    assert g.outputs[b.name] == b.name


def test_validation_error_is_a_graph_error():
    assert issubclass(cc.ValidationError, cc.GraphError)
    assert issubclass(cc.GraphError, cc.ConvcError)


# -- float64 / int64 end to end on C ------------------------------------------------------------
def test_float64_graph_on_c_matches_reference_and_torch():
    g = small_net("float64", seed=3)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 1, 6, 6))
    ref = cc.compile(g, target="numpy").run({"x": a})
    mod = cc.compile(g, target="c")
    got = mod.run({"x": a})
    assert "double" in mod.source
    # torch float64 as an independent oracle
    node = lambda n: torch.from_numpy(g.node(n)["value"])  # noqa: E731
    r = F.relu(F.conv2d(torch.from_numpy(a), node("w"), stride=2, padding=1))
    y = F.linear(torch.flatten(F.max_pool2d(r, 2), 1), node("fw"), node("fb"))
    for name, want in (("y", y.numpy()), ("feat", r.numpy())):
        assert got[name].dtype == np.float64 and ref[name].dtype == np.float64
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12, err_msg=f"{name}: C vs numpy")
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12, err_msg=f"{name}: C vs torch")


def test_int64_inputs_are_accepted_and_copied_exactly():
    g = cc.Graph("labels")
    lab = g.input("labels", (2, 3), "int64")
    assert lab.dtype == "int64"
    other = g.input("more", (2, 1), "int64")
    g.output(lab, "same")
    g.output(cc.reshape(lab, (3, 2)), "reshaped")
    g.output(cc.concat([lab, other], axis=1), "joined")
    a = np.array([[0, 2**40, -7], [9, 1, 2**62]], np.int64)
    b = np.array([[5], [-(2**50)]], np.int64)
    for target in ("numpy", "c"):
        res = cc.compile(g, target=target).run({"labels": a, "more": b})
        for k, want in (("same", a), ("reshaped", a.reshape(3, 2)), ("joined", np.concatenate([a, b], 1))):
            assert res[k].dtype == np.int64, (target, k)
            np.testing.assert_array_equal(res[k], want, err_msg=f"{k} on {target}")


def test_run_checks_dtype_of_int64_input():
    g = cc.Graph("lab")
    g.output(g.input("labels", (3,), "int64"), "o")
    with pytest.raises(cc.InputError):
        cc.compile(g, target="numpy").run({"labels": np.zeros(3, np.float32)})


# -- generated source -----------------------------------------------------------------------------
def test_generated_source_is_deterministic():
    a = generate(small_net()).text
    b = generate(small_net()).text            # a separately built, identical graph
    g = small_net()
    c, d = generate(g).text, generate(g).text
    assert a.encode() == b.encode() == c.encode() == d.encode()
    assert cc.compile(g, target="c", passes="none").source == a
    assert cc.compile(g, target="c").source == cc.compile(small_net(), target="c").source   # with passes too
    # and it depends on the graph
    assert generate(small_net("float64")).text != a


def test_source_banner_and_one_function_per_op_node():
    g = small_net()
    src = generate(g).text
    assert src.lstrip().startswith("/*") and "Generated by convc" in src.splitlines()[0]
    op_nodes = [n for n in g.nx.nodes if g.node(n)["op"] not in ("input", "param")]
    assert sorted(op_nodes) == ["c1", "fc", "fl", "mp", "r1"]
    # the flatten of mp's result is mp's buffer under a second name: no function, no copy
    assert "node_fl" not in src and "t_mp" in src
    op_nodes.remove("fl")
    fns = re.findall(r"^static void (node_\w+)\s*\(", src, re.M)
    assert sorted(fns) == sorted(f"node_{n}" for n in op_nodes)
    for n in op_nodes:                                   # each called exactly once
        assert len(re.findall(rf"\bnode_{n}\s*\(", src)) == 2, n


# -- C identifiers derived from node names --------------------------------------------------------
@pytest.mark.parametrize("pname", [
    "int", "double", "exp", "tanh", "size_t", "uint8_t", "main", "y", "net_run",
    "memcpy", "INFINITY", "NULL",
])
def test_param_names_that_clash_with_c_identifiers_compile(pname):
    g = cc.Graph("net")
    x = g.input("x", (2, 3))
    p = g.param(pname, np.arange(6, dtype=np.float32).reshape(2, 3))
    s = cc.add(x, p, name="s")
    g.output(s, "a")
    g.output(s, "b")                          # second name: forces an output copy (memcpy)
    a = np.ones((2, 3), np.float32)
    res = cc.compile(g, target="c").run({"x": a})
    want = a + np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(res["a"], want)
    np.testing.assert_array_equal(res["b"], want)


def test_node_names_with_dots_and_dashes_compile():
    g = cc.Graph("net")
    x = g.input("in.put-1", (2, 3))
    r = cc.relu(x, name="block1.relu-a")
    t = cc.tanh(r, name="block1_relu_a")        # same C spelling after sanitising
    g.output(t, "out")
    a = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    res = cc.compile(g, target="c").run({"in.put-1": a})
    np.testing.assert_allclose(res["out"], np.tanh(np.maximum(a, 0)), rtol=1e-6)
