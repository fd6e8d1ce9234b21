"""A real detection client of the ``features_only`` backbones: torchvision's Faster R-CNN with an FPN over pvig,
MobileViG and GreedyViG, trained for two steps under DistributedDataParallel on two gloo processes with
``find_unused_parameters=False`` (the default of torchvision's, mmdetection's and detectron2's trainers).

DDP checks at the start of each step that every parameter got its gradient in the previous one, so a backbone that
keeps a parameter the maps do not use (a classifier head left behind) stops the second step. Each process trains on
one image of detection size (512 x 640, one box), which the detector's transform halves (``min_size`` 256,
``max_size`` 320) to keep the test to seconds; the two ranks must end with the same weights.
"""
from __future__ import annotations

import os
import socket
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vig  # noqa: F401  (registers the models)

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE_SIZE = (512, 640)  # (H, W), COCO-like aspect
MIN_SIZE, MAX_SIZE = 256, 320  # the detector's resize: half the image side, for a CPU test
FPN_CHANNELS = 32


class TimmFPN(nn.Module):
    """A timm ``features_only`` model and an FPN over its maps: images (B, 3, H, W) -> {'0'..'3', 'pool'} maps of
    ``out_channels`` channels (strides 4 to 64), the backbone interface torchvision's detectors take."""

    def __init__(self, name: str, out_channels: int = FPN_CHANNELS) -> None:
        super().__init__()
        self.body = timm.create_model(name, features_only=True)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(self.body(x))))


def _detector(name: str) -> FasterRCNN:
    """Faster R-CNN (2 classes) with a small resize and few proposals: a small but complete training step."""
    return FasterRCNN(TimmFPN(name), num_classes=2, min_size=MIN_SIZE, max_size=MAX_SIZE,
                      rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_batch_size_per_image=32,
                      box_batch_size_per_image=16)


def _train_two_steps(rank: int, port: int, name: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_detector(name).train(), find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)
        images = [torch.rand(3, *IMAGE_SIZE, generator=generator)]
        targets = [{"boxes": torch.tensor([[100.0 + 40 * rank, 120.0, 300.0, 360.0]]),
                    "labels": torch.tensor([1])}]
        outcome = "trained"
        try:
            for _ in range(2):
                losses = model(images, targets)
                optimizer.zero_grad()
                sum(losses.values()).backward()
                optimizer.step()
        except RuntimeError as err:
            outcome = str(err).strip().splitlines()[0]
        Path(folder, f"rank{rank}").write_text(outcome)
        checksum = sum(param.double().sum() for param in model.parameters()).item()
        Path(folder, f"weights{rank}").write_text(repr(checksum))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["pvig_ti_224_gelu", "mobilevig_ti", "greedyvig_s"])
def test_faster_rcnn_trains_on_a_features_only_backbone_under_ddp(tmp_path: Path, name: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawn, not fork: a forked pytest worker that already ran autograd cannot run backward in the children
    mp.start_processes(_train_two_steps, args=(port, name, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    outcomes = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert outcomes == ["trained", "trained"], outcomes
    weights = [(tmp_path / f"weights{rank}").read_text() for rank in (0, 1)]
    assert weights[0] == weights[1], "the ranks' weights differ after two DDP steps"
