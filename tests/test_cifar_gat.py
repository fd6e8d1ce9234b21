"""cnn_gat_cifar: training steps, deterministic evaluation, graphs, checkpoints, EMA and flip TTA."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

import vig  # noqa: F401  (registers the models with timm)
from gcn_lib import grid_edges, to_pyg
from vig.models.cifar_gat import GRAPH_LAYERS, CnnGatCifar, predict_flip_tta

SMALL = dict(embed_dim=16, hidden=16, heads=2, num_blocks=2)
GRID_EDGES_16 = 4 * 16 * 16 - 4 * 16  # directed 4-neighbour edges of a 16 x 16 map


def small_model(seed: int = 0, **kwargs) -> CnnGatCifar:
    torch.manual_seed(seed)
    return timm.create_model("cnn_gat_cifar", **{**SMALL, **kwargs})


def images(batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.t().tolist()))


def train_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("conv", GRAPH_LAYERS)
def test_each_conv_trains_a_step_and_evaluates_deterministically(conv: str) -> None:
    model = small_model(conv=conv, knn=4, edge_drop=0.2, drop=0.1, attn_drop=0.1)
    x, labels = images(), torch.tensor([0, 1, 2, 3])
    before = copy.deepcopy(model.state_dict())
    loss = train_step(model, x, labels)
    assert torch.isfinite(torch.tensor(loss))
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert not torch.equal(model.stem[0][1].running_mean, before["stem.0.1.running_mean"])

    model.eval().double()
    x64 = x.double()
    with torch.no_grad():
        first, second = model(x64), model(x64)
        alone = model(x64[:1])
    assert first.shape == (4, 10)
    assert torch.equal(first, second)
    # eval mode reaches the CNN's BatchNorm: an image's logits do not depend on its batch
    torch.testing.assert_close(alone, first[:1])


def test_checkpoint_round_trip_includes_the_cnn() -> None:
    model = small_model(knn=4)
    train_step(model, images(), torch.tensor([0, 1, 2, 3]))
    state = model.state_dict()
    stem_keys = {k for k in state if k.startswith("stem.")}
    assert {"stem.0.0.weight", "stem.0.1.running_mean", "stem.3.1.num_batches_tracked"} <= stem_keys
    assert len(stem_keys) == 4 * 6  # per stage: conv weight; BN weight, bias, running mean / var, count

    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    buffer.seek(0)
    restored = small_model(seed=123, knn=4)
    assert not torch.equal(restored.stem[0][0].weight, model.stem[0][0].weight)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["state_dict"])
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images(seed=5)), model(images(seed=5)), rtol=0, atol=0)


def test_ema_averages_the_cnn() -> None:
    model = small_model()
    ema = ModelEmaV3(model, decay=0.25)
    old_weight = model.stem[0][0].weight.detach().clone()
    old_mean = model.stem[0][1].running_mean.clone()
    train_step(model, images(), torch.tensor([0, 1, 2, 3]))
    ema.update(model)
    torch.testing.assert_close(ema.module.stem[0][0].weight, 0.25 * old_weight + 0.75 * model.stem[0][0].weight.detach())
    torch.testing.assert_close(ema.module.stem[0][1].running_mean, 0.25 * old_mean + 0.75 * model.stem[0][1].running_mean)


def test_flip_tta_is_the_mean_of_the_two_passes() -> None:
    model = small_model(knn=3).eval().double()
    x = images(batch=3, dtype=torch.float64)
    with torch.no_grad():
        tta = predict_flip_tta(model, x)
        torch.testing.assert_close(tta, (model(x) + model(x.flip(-1))) / 2, rtol=0, atol=0)
        torch.testing.assert_close(predict_flip_tta(model, x.flip(-1)), tta)
        assert not torch.allclose(tta, model(x))


@pytest.mark.parametrize("use_xy", [True, False])
def test_nodes_per_position_with_optional_coordinates(use_xy: bool) -> None:
    model = small_model(use_xy=use_xy).eval()
    with torch.no_grad():
        feature_map = model.stem(images(batch=2))
    assert feature_map.shape == (2, 16, 16, 16)
    nodes = model.nodes(feature_map)
    assert nodes.shape == (2 * 256, 16 + (2 if use_xy else 0))
    torch.testing.assert_close(nodes[:, :16], feature_map.permute(0, 2, 3, 1).reshape(-1, 16))
    if use_xy:
        yx = nodes[:, 16:].view(2, 16, 16, 2)
        torch.testing.assert_close(yx[1, 5, 15], torch.tensor([5 / 15, 1.0]))
        assert float(yx.min()) == 0.0 and float(yx.max()) == 1.0


def test_grid_graph_size_without_knn() -> None:
    model = small_model().train()
    feature_map = torch.randn(3, 16, 16, 16)
    edge_index = model.edges(feature_map)
    assert edge_index.shape == (2, 3 * GRID_EDGES_16)
    assert torch.equal(edge_index, to_pyg(grid_edges(16, 16, batch_size=3)))


@pytest.mark.parametrize("knn", [1, 6])
def test_graph_with_knn_edges_is_grid_union_cosine_neighbours(knn: int) -> None:
    model = small_model(knn=knn).eval()
    batch, size, channels = 2, 16, 16
    feature_map = torch.randn(batch, channels, size, size, dtype=torch.float64)
    edge_index = model.edges(feature_map)
    source, target = edge_index
    nodes = size * size

    expected = {(j, i) for i, j in grid_edges(size, size, batch_size=batch).t().tolist()}
    features = torch.nn.functional.normalize(feature_map.permute(0, 2, 3, 1).reshape(batch, nodes, channels), dim=-1)
    for b in range(batch):
        cosine = features[b] @ features[b].t()
        cosine.fill_diagonal_(-2.0)
        nearest = cosine.topk(knn, dim=1).indices
        expected |= {(b * nodes + j, b * nodes + i) for i in range(nodes) for j in nearest[i].tolist()}
    assert edge_set(edge_index) == expected
    assert edge_index.shape[1] == len(expected)  # duplicates merged
    assert GRID_EDGES_16 * batch < edge_index.shape[1] <= (GRID_EDGES_16 + knn * nodes) * batch
    assert torch.equal(source // nodes, target // nodes)
    assert not bool((source == target).any())
    in_degree = torch.bincount(target, minlength=batch * nodes)
    assert int(in_degree.min()) >= max(knn, 2) and int(in_degree.max()) <= 4 + knn


def test_drop_edge_only_in_training() -> None:
    model = small_model(knn=4, edge_drop=0.5)
    feature_map = torch.randn(2, 16, 16, 16)
    model.eval()
    full = model.edges(feature_map)
    assert torch.equal(model.edges(feature_map), full)
    model.train()
    torch.manual_seed(0)
    dropped = model.edges(feature_map)
    assert 0.3 * full.shape[1] < dropped.shape[1] < 0.7 * full.shape[1]
    assert edge_set(dropped) <= edge_set(full)
    torch.manual_seed(1)
    assert not torch.equal(model.edges(feature_map), dropped)


def test_defaults_pretrained_cfg_and_classifier() -> None:
    model = timm.create_model("cnn_gat_cifar")
    assert (model.conv_type, model.embed_dim, model.hidden, len(model.blocks)) == ("gat", 128, 256, 3)
    assert (model.input_layer.heads, model.input_layer.out_channels) == (8, 256)
    assert model.input_layer.add_self_loops is False
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0 and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    assert model.get_classifier() is model.head.fc2
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


def test_timm_drop_rate_sets_the_dropout() -> None:
    model = small_model(drop_rate=0.3)
    assert model.head.drop.p == 0.3 and model.blocks[0].drop.p == 0.3


@pytest.mark.parametrize("kwargs", [
    dict(conv="gin"), dict(heads=0), dict(num_blocks=0), dict(knn=-1), dict(edge_drop=1.0),
    dict(drop=-0.1), dict(attn_drop=1.5), dict(negative_slope=-0.2), dict(hidden=2.5),
])
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CnnGatCifar(**{**SMALL, **kwargs})
