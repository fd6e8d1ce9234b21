"""Batch-graph head (vig.models.batch_graph, issue #16): EdgeNet / NodeNet rules against hand computations,
edge targets (hard, soft, mixup with smoothing), gradients, transductive equivariance, a batch of one,
checkpoints and backbone weights (local file; a failed download is one line)."""
from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data.mixup import mixup_target
from torch.testing import assert_close

import train
from tests.shared_files import shared_path
from tests.train_helpers import last_json_line
from vig.errors import RunError, UsageError, WeightsUnavailableError
from vig.trainer.curves import draw_curves, read_summary
from vig.trainer.distributed import DistributedContext
from vig.trainer.engine import Precision, train_one_epoch
from vig.trainer.step import EdgeLoss, TrainStep
from vig.trainer.setup import resolve_edge_loss_weight
from vig.models.batch_graph import (BatchGraphNet, EdgeNet, NodeNet, aggregate_neighbours, edge_targets,
                                    label_to_edge)
from vig.models.training_api import BatchDependent, ExtraLosses

BACKBONE = "mobilenetv3_small_050"  # smallest timm backbone at hand; 288 pooled features


def _model(seed: int = 0, **kwargs) -> BatchGraphNet:
    torch.manual_seed(seed)
    return timm.create_model("bgnn", backbone=BACKBONE, num_classes=5, edge_features=8, **kwargs)


def _hand_weights(edge_sim: torch.Tensor) -> torch.Tensor:
    """A = edge_sim + I + 1e-6, each row divided by its sum, entry by entry."""
    size = edge_sim.shape[0]
    weights = torch.empty_like(edge_sim)
    for i in range(size):
        row = [edge_sim[i, j] + (1.0 if i == j else 0.0) + 1e-6 for j in range(size)]
        total = sum(row)
        for j in range(size):
            weights[i, j] = row[j] / total
    return weights


def _hand_aggregate(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Zero diagonal, each row over the sum of its off-diagonal entries (0 when there are none), a = A x."""
    size = x.shape[0]
    out = torch.zeros_like(x)
    for i in range(size):
        total = sum(abs(weights[i, j]) for j in range(size) if j != i)
        for j in range(size):
            if j != i and total > 0:
                out[i] += weights[i, j] / total * x[j]
    return out


@pytest.mark.parametrize("ratio", [(1,), (2, 1)])
@pytest.mark.parametrize("batch", [2, 5])
def test_edge_and_node_net_shapes(ratio: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 12)
    weights, edge_sim = EdgeNet(12, 6, ratio)(x)
    assert weights.shape == edge_sim.shape == (batch, batch)
    assert bool(((edge_sim > 0) & (edge_sim < 1)).all())
    node_net = NodeNet(12, 7, ratio)
    assert node_net(x, weights).shape == (batch, 7)
    assert node_net(x, weights, pre_logits=True).shape == (batch, node_net.hidden_size)
    assert node_net.hidden_size == (24 if len(ratio) == 1 else 14)


@pytest.mark.parametrize("seed", [0, 1])
def test_row_normalisation_and_zero_diagonal_against_a_hand_computation(seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(4, 3, dtype=torch.float64)
    edge_net = EdgeNet(3, 5).double()
    weights, edge_sim = edge_net(x)
    assert_close(weights, _hand_weights(edge_sim.detach()))
    assert_close(aggregate_neighbours(x, weights.detach()), _hand_aggregate(x, weights.detach()))
    node_net = NodeNet(3, 2).double().eval()
    expected = node_net.classifier(torch.cat([x, _hand_aggregate(x, weights.detach())], 1).t()[None, :, :, None])
    assert_close(node_net(x, weights.detach()), expected[0, :, :, 0].t())


@pytest.mark.parametrize("training", [True, False])
def test_edge_sim_is_symmetric(training: bool) -> None:
    model = _model().train(training)
    with torch.no_grad():
        _, edge_sim = model(torch.randn(6, 3, 32, 32), return_edges=True)
    assert_close(edge_sim, edge_sim.t())


@pytest.mark.parametrize("labels, expected", [
    ([0, 1, 0, 2], [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]),
    ([3, 3], [[1, 1], [1, 1]]),
])
def test_label_to_edge_of_hard_labels(labels: list[int], expected: list[list[int]]) -> None:
    assert_close(label_to_edge(torch.tensor(labels)), torch.tensor(expected, dtype=torch.float32))


def test_label_to_edge_of_soft_labels_is_the_probability_of_sharing_a_class() -> None:
    soft = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 0.8]])
    expected = torch.tensor([[0.5, 0.5, 0.1], [0.5, 1.0, 0.0], [0.1, 0.0, 0.68]])
    assert_close(label_to_edge(soft), expected)
    one_hot = F.one_hot(torch.tensor([2, 0, 2]), 3).float()
    assert_close(label_to_edge(one_hot), label_to_edge(torch.tensor([2, 0, 2])))


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.25])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_edge_targets_undo_mixup_smoothing(lam: float, smoothing: float) -> None:
    labels = torch.tensor([0, 3, 1, 3, 2, 0])
    mixed = mixup_target(labels, 4, lam=lam, smoothing=smoothing)  # what timm's Mixup hands the loss
    unsmoothed = lam * F.one_hot(labels, 4).float() + (1 - lam) * F.one_hot(labels.flip(0), 4).float()
    assert_close(edge_targets(mixed, smoothing), unsmoothed @ unsmoothed.t())
    if lam == 1.0:
        assert_close(edge_targets(mixed, smoothing), label_to_edge(labels))


@pytest.mark.parametrize("backbone", [BACKBONE, "resnet10t"])
def test_the_edge_loss_alone_reaches_the_backbone(backbone: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("bgnn", backbone=backbone, num_classes=3, edge_features=4).train()
    _, edge_sim = model(torch.randn(4, 3, 32, 32), return_edges=True)
    F.binary_cross_entropy(edge_sim, label_to_edge(torch.tensor([0, 1, 0, 2]))).backward()
    grads = [param.grad for param in model.backbone.parameters()]
    assert all(grad is not None for grad in grads)
    assert sum(grad.abs().sum() for grad in grads) > 0
    assert all(param.grad is None for param in model.head.node_net.parameters())


@pytest.mark.parametrize("batch", [3, 6])
def test_eval_predictions_permute_with_the_batch(batch: int) -> None:
    model = _model().eval()
    torch.manual_seed(1)
    images = torch.randn(batch, 3, 32, 32)
    order = torch.randperm(batch)
    with torch.no_grad():
        logits, edge_sim = model(images, return_edges=True)
        logits_p, edge_sim_p = model(images[order], return_edges=True)
        alone = model(images[:1])
    assert_close(logits_p, logits[order])
    assert_close(edge_sim_p, edge_sim[order][:, order])
    assert not torch.allclose(alone, logits[:1])  # transductive: the batch changes a prediction


def test_a_batch_of_one_has_no_neighbours_and_no_nan() -> None:
    model = _model().eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, edge_sim = model(image, return_edges=True)
        features = model.pool(model.forward_features(image))
        weights, _ = model.head.edge_net(features)
        assert_close(aggregate_neighbours(features, weights), torch.zeros_like(features))
        alone = model.head.node_net.classifier(torch.cat([features, torch.zeros_like(features)], 1).t()[None, :, :,
                                                                                                      None])
    assert torch.isfinite(logits).all() and torch.isfinite(edge_sim).all()
    assert_close(logits, alone[0, :, :, 0].t())
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.train()(image)


@pytest.mark.parametrize("layout", ["state dict", "timm pretrained file"])
def test_checkpoint_round_trip(tmp_path: Path, layout: str) -> None:
    source = _model(seed=0).train()
    source(torch.randn(4, 3, 32, 32))  # BatchNorm running statistics away from their initial values
    source.eval()
    path = tmp_path / "bgnn.pth"
    torch.save(source.state_dict(), path)
    if layout == "state dict":
        loaded = _model(seed=1)
        loaded.load_state_dict(torch.load(path, weights_only=True))
    else:
        loaded = _model(seed=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded.eval()(images), source(images))


def test_backbone_weights_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    published = timm.create_model(BACKBONE)  # with its 1000-class classifier, as a published file has
    path = tmp_path / "backbone.pth"
    torch.save(published.state_dict(), path)
    model = _model(backbone_file=str(path))
    weights = published.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub download fails as it does on a machine without a network."""
    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.\nPlease check your connection")
    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_network)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["bgnn", "bgnn_mobilenetv3_small_100"])
def test_pretrained_without_a_network_fails_with_one_line(name: str) -> None:
    with pytest.raises(WeightsUnavailableError) as caught:
        timm.create_model(name, pretrained=True, num_classes=3)
    message = str(caught.value)
    assert isinstance(caught.value, RunError) and caught.value.argument == "backbone_file"
    assert "\n" not in message and "backbone_file=PATH" in message
    assert "train.py" not in message and "--" not in message  # the model speaks of its arguments, not of flags


def test_the_model_tells_the_trainer_its_edge_loss_and_batch_needs() -> None:
    """The trainer finds the edge loss and the batch-size need through `vig.models.training_api`, and the edge
    term is BCE(edge_sim, same-class matrix) of the training forward's edges."""
    model = _model().train()
    assert isinstance(model, ExtraLosses) and isinstance(model, BatchDependent)
    assert model.extra_loss_names == ("edge",) and model.min_train_batch_size == 2
    for other in (timm.create_model("resnet10t", num_classes=3), timm.create_model("vig_ti_cifar", depth=1)):
        assert not isinstance(other, ExtraLosses) and not isinstance(other, BatchDependent)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 2])
    logits, edge_sim = model(images, **model.extra_forward_kwargs)
    assert logits.shape == (4, 5) and edge_sim.shape == (4, 4)
    expected = F.binary_cross_entropy(edge_sim, label_to_edge(targets))
    assert_close(model.extra_losses(edge_sim, targets), {"edge": expected})


class _OtherExtraLoss(torch.nn.Module):
    """A model with an extra loss term train.py has no weight flag for."""

    extra_forward_kwargs = {"return_depth": True}
    extra_loss_names = ("depth",)

    def extra_losses(self, extras, targets, label_smoothing=0.0):
        return {"depth": extras.mean()}


@pytest.mark.parametrize("model, flags, expected", [
    ("bgnn", dict(edge_loss_weight=None), 1.0),
    ("bgnn", dict(edge_loss_weight=0.25), 0.25),
    ("resnet10t", dict(edge_loss_weight=None), None),
    ("resnet10t", dict(edge_loss_weight=1.0), "--edge-loss-weight needs a model with a batch-graph edge head"),
    ("bgnn", dict(edge_loss_weight=None, batch_size=1), "--batch-size must be >= 2, got 1"),
    ("other", dict(edge_loss_weight=None), "trains on the loss terms depth; train.py weighs only"),
])
def test_the_trainer_resolves_the_edge_loss_weight_from_the_models_protocols(model: str, flags: dict,
                                                                              expected: float | str | None) -> None:
    built = {"bgnn": _model, "other": _OtherExtraLoss}.get(model, lambda: timm.create_model(model, num_classes=3))()
    settings = {"batch_size": 4, **flags}
    if isinstance(expected, str):
        with pytest.raises(UsageError, match=re.escape(expected)):
            resolve_edge_loss_weight(settings["edge_loss_weight"], model, settings["batch_size"], built)
    else:
        assert resolve_edge_loss_weight(settings["edge_loss_weight"], model, settings["batch_size"], built) == expected


@pytest.mark.parametrize("backbone, width", [("resnet10t", 512), ("mobilenetv3_small_100", 576)])
def test_node_features_are_the_pooled_backbone_map(backbone: str, width: int) -> None:
    model = timm.create_model("bgnn", backbone=backbone, num_classes=3, edge_features=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model.pool(model.forward_features(images)),
                     model.backbone.forward_features(images).mean(dim=(2, 3)))
    assert model.num_features == width
    assert not any("conv_head" in key for key in model.state_dict())


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_the_trainer_adds_the_weighted_edge_loss_and_backpropagates_it(weight: float) -> None:
    torch.manual_seed(0)
    batch = (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 2, 1, 0]))
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    results = {}
    for edge_weight in (0.0, weight):
        model = _model(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = TrainStep(model, optimizer, EdgeLoss(torch.nn.CrossEntropyLoss(), edge_weight),
                         Precision("cpu", None, None))
        stats = train_one_epoch(0, [batch], step, ctx, 0)
        results[edge_weight] = (stats, model.backbone.conv_stem.weight.detach().clone())
    (plain, plain_stem), (weighted, weighted_stem) = results[0.0], results[weight]
    assert plain.edge_loss == pytest.approx(weighted.edge_loss) and plain.edge_loss > 0
    # one step: both losses are taken before the update, from the same weights and batch
    assert weighted.loss == pytest.approx(plain.loss + weight * plain.edge_loss, rel=1e-6)
    assert not torch.equal(weighted_stem, plain_stem)  # the edge term changed the backbone's update


def _real_images(root: Path, train_per_class: int, test_per_class: int, classes: int = 3) -> Path:
    """root/{train,test}/<class>/ with the first images of the shared CIFAR-10 subset (32 x 32)."""
    source = shared_path("data", "cifar10-subset")
    for name in sorted(entry.name for entry in (source / "train").iterdir())[:classes]:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            (root / split / name).mkdir(parents=True)
            for image in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(image, root / split / name / image.name)
    return root


TINY = ["--model", "bgnn", "--model-kwargs", f"backbone={BACKBONE}", "edge_features=8", "--img-size", "32",
        "-j", "0", "--val-split", "test"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["--edge-loss-weight", "0.5", "--mixup", "0.8", "--smoothing", "0.1"],
                                    ["--edge-loss-weight", "0"]])
def test_one_epoch_through_train_py_then_evaluate_reports_its_batches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        recipe: list[str]) -> None:
    caplog.set_level(logging.INFO)
    data = _real_images(tmp_path / "data", train_per_class=4, test_per_class=3)  # 12 train, 9 test images
    assert train.main([str(data), *TINY, "--train-split", "train", "-b", "4", "--epochs", "1", "--warmup-epochs",
                       "0", *recipe, "--output", str(tmp_path / "out"), "--experiment", "run"]) == 0
    folder = tmp_path / "out" / "run"
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0"]
    assert 0 < float(rows[0]["train_edge_loss"]) < 10
    assert (folder / "curves.png").is_file()
    assert "(edge loss" in caplog.text and f"weight {float(recipe[1]):g})" in caplog.text
    caplog.clear()

    assert train.main([str(data), *TINY, "-b", "4", "--pretrain_path", str(folder / "last.pth.tar"),
                       "--evaluate"]) == 0
    captured = capsys.readouterr()
    result = last_json_line(captured.out)
    assert (result["count"], result["batch_size"], result["last_batch_sizes"]) == (9, 4, [1])
    assert result["eval_order"] == "shuffled (seed 42)"
    assert "transductive" in caplog.text
    # the training run validated in the same batches (4, 4, 1), so the checkpoint scores the same
    assert result["top1"] == pytest.approx(float(rows[0]["eval_top1"]))
    assert result["loss"] == pytest.approx(float(rows[0]["eval_loss"]), rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet10t", "--edge-loss-weight", "1"], "--edge-loss-weight needs a model with a batch-graph"),
    (["--model", "bgnn", "--edge-loss-weight", "-1"], "--edge-loss-weight must be >= 0"),
    (["--model", "bgnn", "-b", "1"], "--batch-size must be >= 2"),
    (["--model", "bgnn", "--model-kwargs", f"backbone={BACKBONE}", "edge_features=8", "--img-size", "32",
      "-b", "2", "--kd-model-name", "resnet10t", "--kd-pretrained-path", "TEACHER"],
     "--kd-model-name cannot train bgnn"),
])
def test_edge_loss_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             argv: list[str], message: str) -> None:
    data = _real_images(tmp_path / "data", train_per_class=1, test_per_class=1, classes=2)
    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet10t", num_classes=2).state_dict(), teacher)
    argv = [str(teacher) if arg == "TEACHER" else arg for arg in argv]
    assert train.main([str(data), "--train-split", "train", "--val-split", "test", "-j", "0", *argv,
                       "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


@pytest.mark.usefixtures("offline")
def test_pretrained_backbone_without_a_network_is_one_line_through_train_py(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _real_images(tmp_path / "data", train_per_class=1, test_per_class=1, classes=2)
    assert train.main([str(data), "--train-split", "train", "--val-split", "test", "-j", "0", "--model", "bgnn",
                       "--model-kwargs", f"backbone={BACKBONE}", "pretrained=True",
                       "--output", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("error: cannot download the pretrained")
    assert err[0].endswith("pass a local weights file: backbone_file=PATH (train.py --model-kwargs backbone_file=PATH)")


@pytest.mark.parametrize("with_edge_loss", [True, False])
def test_curves_draw_the_edge_loss_when_the_summary_has_it(tmp_path: Path, with_edge_loss: bool) -> None:
    header = "epoch,train_loss,eval_loss,eval_top1,lr" + (",train_edge_loss" if with_edge_loss else "")
    rows = ["0,2.0,1.9,30,0.001" + (",0.7" if with_edge_loss else ""), "1,1.8,1.7,35,0.0005" +
            (",0.6" if with_edge_loss else "")]
    (tmp_path / "summary.csv").write_text("\n".join([header, *rows]) + "\n")
    run = read_summary(tmp_path / "summary.csv")
    loss_panel = draw_curves([run]).axes[0]
    assert len(loss_panel.get_lines()) == (3 if with_edge_loss else 2)
    if with_edge_loss:
        assert run.columns["train_edge_loss"] == [0.7, 0.6]
