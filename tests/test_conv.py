"""Graph convolution modules: published layout, per-operator math against loops, graph forms, errors."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

import gcn_lib.dynamic

from gcn_lib import (CONVS, MASK_CONVS, BasicConv, DynConv2d, act_layer, dense_knn, graph_conv, interleave_channels,
                     knn_to_edge_index, knn_to_mask, norm_layer, threshold_mask)


def _knn_graph(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n)]) for _ in range(b)])


def _column(x: torch.Tensor, b: int, i: int) -> torch.Tensor:
    """Features of node i of image b as a (1, C, 1, 1) map."""
    return x[b:b + 1, :, i:i + 1, :]


def _brute_conv(conv: torch.nn.Module, name: str, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Apply each operator's formula node by node."""
    b, c, n, _ = x.shape
    rows = []
    for bb in range(b):
        cols = []
        for i in range(n):
            x_i = _column(x, bb, i)
            x_js = [_column(x, bb, j) for j in idx[bb, i].tolist()]
            if name == "mr":
                m = torch.stack([x_j - x_i for x_j in x_js]).amax(0)
                cols.append(conv.nn(interleave_channels(x_i, m)))
            elif name == "edge":
                cols.append(torch.stack([conv.nn(torch.cat([x_i, x_j - x_i], 1)) for x_j in x_js]).amax(0))
            elif name == "sage":
                pooled = torch.stack([conv.nn1(x_j) for x_j in x_js]).amax(0)
                cols.append(conv.nn2(torch.cat([x_i, pooled], 1)))
            else:
                cols.append(conv.nn((1 + conv.eps) * x_i + sum(x_js)))
        rows.append(torch.cat(cols, dim=2))
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("name", CONVS)
def test_conv_matches_formula(name):
    torch.manual_seed(0)
    conv = graph_conv(name, 8, 12, act="gelu", norm="batch").double().eval()
    if name == "gin":
        conv.eps.data.fill_(0.25)
    for module in conv.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 6, 1, dtype=torch.float64)
    idx = _knn_graph(2, 6, 3)
    out = conv(x, idx)
    assert out.shape == (2, 12, 6, 1)
    torch.testing.assert_close(out, _brute_conv(conv, name, x, idx))


@pytest.mark.parametrize("name,forms", [("mr", ["mask", "edges"]), ("gin", ["mask"])])
def test_graph_forms_agree(name, forms):
    torch.manual_seed(1)
    conv = graph_conv(name, 8, 8, norm="batch").double().eval()
    x = torch.randn(2, 8, 10, 1, dtype=torch.float64)
    idx = _knn_graph(2, 10, 4)
    expected = conv(x, idx)
    graphs = {"mask": knn_to_mask(idx), "edges": knn_to_edge_index(idx)}
    for form in forms:
        torch.testing.assert_close(conv(x, graphs[form]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,graph", [
    ("edge", "mask"), ("sage", "mask"), ("gin", "edges"), ("edge", "edges"),
])
def test_unsupported_graph_form_is_a_clear_error(name, graph):
    conv = graph_conv(name, 4, 4)
    idx = _knn_graph(1, 5, 2)
    g = knn_to_mask(idx) if graph == "mask" else knn_to_edge_index(idx)
    with pytest.raises(ValueError, match=f"conv='{name}' does not take"):
        conv(torch.randn(1, 4, 5, 1), g)


def test_graph_must_be_a_graph():
    with pytest.raises(ValueError, match="graph must be"):
        graph_conv("mr", 4, 4)(torch.randn(1, 4, 5, 1), torch.randn(1, 5, 2))


def test_mr_interleaves_channels():
    x = torch.arange(3.0).view(1, 3, 1, 1)
    m = 10 + torch.arange(3.0).view(1, 3, 1, 1)
    assert interleave_channels(x, m).flatten().tolist() == [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]


def test_published_parameter_layout():
    conv = DynConv2d(192, 384, act="gelu", norm="batch")
    shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
    assert shapes == {
        "gconv.nn.0.weight": (384, 96, 1, 1),
        "gconv.nn.0.bias": (384,),
        "gconv.nn.1.weight": (384,),
        "gconv.nn.1.bias": (384,),
        "gconv.nn.1.running_mean": (384,),
        "gconv.nn.1.running_var": (384,),
        "gconv.nn.1.num_batches_tracked": (),
    }


@pytest.mark.parametrize("graph,kwargs", [
    ("knn", {"kernel_size": 4, "dilation": 2}),
    ("knn", {"kernel_size": 3, "r": 2}),
    ("threshold", {"threshold": 0.8}),
    ("threshold", {"threshold": 0.0}),
    ("threshold", {"threshold": 0.8, "r": 2}),
])
@pytest.mark.parametrize("conv", ["mr", "gin"])
def test_dynamic_conv_shapes(graph, kwargs, conv):
    layer = DynConv2d(8, 16, conv=conv, graph=graph, norm="batch", **kwargs)
    out = layer(torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 16, 4, 4)


def test_dynamic_conv_matches_explicit_graph():
    torch.manual_seed(2)
    layer = DynConv2d(8, 16, kernel_size=3, dilation=2, act="gelu", norm="batch").double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    expected = layer.gconv(x.reshape(2, 8, 16, 1), dense_knn(x, 3, 2)).reshape(2, 16, 4, 4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"conv": "gat"}, "conv='gat' is not supported"),
    ({"act": "swish2"}, "act='swish2' is not supported"),
    ({"norm": "layer"}, "norm='layer' is not supported"),
    ({"graph": "radius"}, "graph='radius' is not supported"),
    ({"graph": "threshold"}, "needs a threshold"),
    ({"graph": "threshold", "threshold": 1.0}, "below 1"),
    ({"threshold": 0.5}, "graph='knn' does not use threshold=0.5"),
    ({"kernel_size": 3, "threshold": 0.0}, "graph='knn' does not use threshold=0.0"),
    ({"kernel_size": 0}, "must be >= 1"),
])
def test_dynamic_conv_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynConv2d(8, 8, **kwargs)


@pytest.mark.parametrize("name,value", [
    ("kernel_size", 5), ("kernel_size", 1), ("dilation", 2), ("stochastic", True), ("epsilon", 0.2),
])
def test_threshold_graph_refuses_knn_arguments(name, value):
    """A kNN-only argument at any value but its default is a one-line error, not silently ignored."""
    with pytest.raises(ValueError) as info:
        DynConv2d(8, 8, graph="threshold", threshold=0.5, **{name: value})
    message = str(info.value)
    assert message.startswith(f"graph='threshold' does not use {name}={value!r}") and "\n" not in message


def test_threshold_graph_accepts_knn_arguments_at_their_defaults():
    torch.manual_seed(4)
    defaults = dict(kernel_size=9, dilation=1, stochastic=False, epsilon=0.0, r=1)
    layer = DynConv2d(8, 16, graph="threshold", threshold=0.6, **defaults).double().eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    expected = layer.gconv(x.reshape(2, 8, 9, 1), threshold_mask(x, 0.6)).reshape(2, 16, 3, 3)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("with_relative", [False, True])
@pytest.mark.parametrize("conv", ["mr", "gin"])
def test_threshold_graph_takes_pooled_keys_and_relative_pos(r, with_relative, conv):
    """Pyramid ViG's threshold graph: N centres against the M = N / r^2 pooled keys, relative_pos (1, N, M)."""
    torch.manual_seed(5)
    layer = DynConv2d(8, 16, conv=conv, graph="threshold", threshold=0.7, r=r, act="gelu", norm="batch").double().eval()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    m = 64 // (r * r)
    relative = -torch.rand(1, 64, m, dtype=torch.float64) if with_relative else None
    keys = torch.nn.functional.avg_pool2d(x, r, r)
    mask = threshold_mask(x, 0.7, y=keys, relative_pos=relative)
    assert layer.build_graph(x, None if r == 1 else keys, relative).shape == (2, 64, m)
    expected = layer.gconv(x.reshape(2, 8, 64, 1), mask, None if r == 1 else keys.reshape(2, 8, m, 1))
    torch.testing.assert_close(layer(x, relative), expected.reshape(2, 16, 8, 8), rtol=0, atol=0)


@pytest.mark.parametrize("conv", CONVS)
def test_threshold_graph_takes_exactly_the_mask_convs(conv):
    """Refused at construction iff the operator cannot take the threshold graph's mask (B, N, N)."""
    x = torch.randn(2, 8, 3, 3)
    mask = threshold_mask(x, 0.5)
    if conv in MASK_CONVS:
        graph_conv(conv, 8, 8)(x.reshape(2, 8, 9, 1), mask)
        assert DynConv2d(8, 8, conv=conv, graph="threshold", threshold=0.5)(x).shape == (2, 8, 3, 3)
        return
    with pytest.raises(ValueError, match="does not take a graph given as 'mask'"):
        graph_conv(conv, 8, 8)(x.reshape(2, 8, 9, 1), mask)
    with pytest.raises(ValueError) as info:
        DynConv2d(8, 8, conv=conv, graph="threshold", threshold=0.5)
    message = str(info.value)
    assert f"conv={conv!r}" in message and message.endswith("convs for the threshold graph: mr, gin")
    assert "\n" not in message


def test_dynamic_conv_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        DynConv2d(8, 8)(torch.randn(2, 8, 16))


@pytest.mark.parametrize("k, dilation, side, capped", [(9, 1, 2, (4, 1)), (9, 3, 5, (9, 2)), (4, 4, 3, (4, 2)),
                                                        (9, 2, 5, (9, 2))])
def test_dynamic_conv_caps_knn_to_the_nodes_of_the_call_with_one_warning(
        k: int, dilation: int, side: int, capped: tuple[int, int], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcn_lib.dynamic, "_logged_caps", set())  # a cap another test logged is logged again here
    torch.manual_seed(0)
    x = torch.randn(2, 8, side, side, dtype=torch.float64)
    layer = DynConv2d(8, 16, kernel_size=k, dilation=dilation).double().eval()
    reference = DynConv2d(8, 16, kernel_size=capped[0], dilation=capped[1]).double().eval()
    reference.load_state_dict(layer.state_dict())
    with caplog.at_level(logging.WARNING, logger="gcn_lib.dynamic"):
        out = layer(x)
        layer(x)
    assert_close(out, reference(x), rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if "cap the kNN graph" in r.getMessage()]
    assert len(warnings) == (0 if capped == (k, dilation) else 1)


def test_dense_knn_itself_refuses_k_beyond_the_nodes():
    with pytest.raises(ValueError, match="exceeds the number of nodes"):
        dense_knn(torch.randn(1, 8, 2, 2), 9)


@pytest.mark.parametrize("name", ["relu", "gelu", "leakyrelu", "prelu", "hswish", "GELU"])
def test_act_layer_builds(name):
    assert isinstance(act_layer(name), torch.nn.Module)


def test_norm_layer_and_basic_conv():
    assert isinstance(norm_layer("batch", 8), torch.nn.BatchNorm2d)
    assert isinstance(norm_layer("instance", 8), torch.nn.InstanceNorm2d)
    block = BasicConv([8, 16], act="relu", norm="batch", drop=0.1)
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d"]
    assert block[0].groups == 4 and torch.count_nonzero(block[0].bias) == 0
    with pytest.raises(ValueError, match="divisible by groups"):
        BasicConv([6, 8])


@pytest.mark.parametrize("graph,kwargs", [
    ("knn", {"kernel_size": 4, "dilation": 2}),
    ("knn", {"kernel_size": 3, "r": 2}),
    ("threshold", {"threshold": 0.5}),
    ("threshold", {"threshold": 0.5, "r": 2}),
])
def test_dynamic_conv_compiles_as_one_graph(graph, kwargs):
    """No host synchronisation and no graph break: fullgraph compile, same values and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    layer = DynConv2d(8, 16, act="gelu", norm="batch", graph=graph, **kwargs).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
