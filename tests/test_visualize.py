"""vig.tools.visualize: graph capture by hooks, the picture's layout, and the CLI on real vig models."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from gcn_lib import DynConv2d, dense_knn, knn_to_mask, reduced_keys, svga_mask, threshold_mask
from tests.shared_files import shared_path
from vig.tools.visualize import (BlockGraph, axial_graphs, capture_graphs, default_blocks, draw_graphs, graph_convs,
                                 graph_figure_size_px, main, parse_blocks, parse_node)

REPO_ROOT = Path(__file__).resolve().parents[1]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file."""
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


class TinyGrapher(nn.Module):
    """fc1 -> dynamic graph conv -> fc2 with a residual, the layout of a ViG Grapher."""

    def __init__(self, channels: int, **graph: object) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels, 1)
        self.graph_conv = DynConv2d(channels, 2 * channels, **graph)
        self.fc2 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.graph_conv(self.fc1(x)))


class TinyViG(nn.Module):
    """Patch stem (8x8 patches) and a backbone of (Grapher, FFN) blocks; (B, 3, 8h, 8w) -> (B, C)."""

    def __init__(self, graphs: list[dict[str, object]], channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 8, stride=8)
        self.backbone = nn.Sequential(*[nn.Sequential(TinyGrapher(channels, **g), nn.Conv2d(channels, channels, 1))
                                        for g in graphs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.stem(x)).mean(dim=(2, 3))


def block_input(model: TinyViG, image: torch.Tensor, block: int) -> torch.Tensor:
    """What the graph conv of ``block`` receives, computed without hooks: (1, C, h, w)."""
    x = model.stem(image)
    for earlier in model.backbone[:block]:
        x = earlier(x)
    return model.backbone[block][0].fc1(x)


@torch.no_grad()
def test_capture_graphs_records_each_blocks_own_graph() -> None:
    torch.manual_seed(0)
    model = TinyViG([{"kernel_size": 5}, {"graph": "threshold", "threshold": 0.8},
                     {"kernel_size": 3, "dilation": 2}]).double().train()
    image = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    graphs = capture_graphs(model, image, [2, 0, 1])
    assert [g.block for g in graphs] == [2, 0, 1]
    assert [g.kind for g in graphs] == ["knn", "knn", "threshold"]
    assert all(g.grid == (6, 5) for g in graphs)
    model.eval()
    expected = {0: knn_to_mask(dense_knn(block_input(model, image, 0), 5), 30)[0],
                1: threshold_mask(block_input(model, image, 1), 0.8)[0],
                2: knn_to_mask(dense_knn(block_input(model, image, 2), 3, 2), 30)[0]}
    for graph in graphs:
        torch.testing.assert_close(graph.neighbours, expected[graph.block], rtol=0, atol=0)
    assert graphs[0].degrees.tolist() == [3] * 30
    assert graphs[0].label == "k = 3, dilation = 2" and graphs[2].label == "t = 0.8"
    assert model.training is False  # left as it was (eval) after the call
    assert all(not conv._forward_pre_hooks for conv in model.modules() if isinstance(conv, DynConv2d))


def test_capture_graphs_restores_training_mode_and_rejects_bad_blocks() -> None:
    model = TinyViG([{"kernel_size": 3}] * 2).train()
    capture_graphs(model, torch.randn(1, 3, 32, 32), [1])
    assert model.training is True
    with pytest.raises(ValueError, match=r"block\(s\) \[2\] out of range: the model has blocks 0..1"):
        capture_graphs(model, torch.randn(1, 3, 32, 32), [0, 2])


@pytest.mark.parametrize("text, expected", [("7,7", (7, 7)), (" 0, 13", (0, 13))])
def test_parse_node(text: str, expected: tuple[int, int]) -> None:
    assert parse_node(text) == expected


@pytest.mark.parametrize("text", ["7", "a,b", "1,2,3", "1.5,2"])
def test_parse_node_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="node must be 'Y,X'"):
        parse_node(text)


def test_parse_blocks_and_defaults() -> None:
    assert parse_blocks("0,5,11,5") == [0, 5, 11]
    assert default_blocks(12) == [0, 5, 11]
    assert default_blocks(1) == [0]
    with pytest.raises(ValueError, match="comma-separated block numbers"):
        parse_blocks("0,,2")


def synthetic_graph(block: int, kind: str, side: int = 4) -> BlockGraph:
    """A graph on a side x side grid where every node links to itself and node 0."""
    mask = torch.eye(side * side, dtype=torch.bool)
    mask[:, 0] = True
    return BlockGraph(block, kind, mask, (side, side), "test")


@pytest.mark.parametrize("kinds, blocks, size", [
    (["knn"], [0], (340, 380)),
    (["threshold"], [0, 3], (640, 570)),
    (["knn", "threshold"], [0, 5, 11], (940, 870)),
])
def test_draw_graphs_size(tmp_path: Path, kinds: list[str], blocks: list[int], size: tuple[int, int]) -> None:
    assert graph_figure_size_px(len(blocks), kinds) == size
    graphs = {kind: [synthetic_graph(b, kind) for b in blocks] for kind in kinds}
    shown = np.random.default_rng(0).random((64, 64, 3))
    out = tmp_path / "graph.png"
    draw_graphs(graphs, shown, None, "synthetic").savefig(out, dpi=100)
    assert png_size(out) == size


def test_draw_graphs_rejects_node_off_grid() -> None:
    graphs = {"knn": [synthetic_graph(0, "knn")]}
    with pytest.raises(ValueError, match=r"node 4,0 is off the 4x4 patch grid"):
        draw_graphs(graphs, np.zeros((8, 8, 3)), (4, 0), "synthetic")


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    """A 20x16 RGB PNG (the model's transform resizes it to its own input size)."""
    path = tmp_path / "small.png"
    pixels = (np.random.default_rng(1).random((16, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_cli_threshold_and_knn_side_by_side(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "graph.png"
    assert main(["--model", "vig_ti_224_gelu", "--start-thresh", "0.9", "--dec", "0.01", "--graph", "both",
                 "--img-size", "64", "--image", str(small_image), "--node", "3,1", "--blocks", "0,11",
                 "--out", str(out)]) == 0
    assert png_size(out) == graph_figure_size_px(2, ["knn", "threshold"]) == (640, 870)


def test_cli_as_module_default_knn(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "graph.png"
    result = subprocess.run([sys.executable, "-m", "vig.tools.visualize", "--model", "vig_ti_224_gelu",
                             "--image", str(small_image), "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (940, 380)  # blocks 0, 5, 11 of the kNN model


def test_cli_draws_threshold_models_own_graph(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "graph.png"
    assert main(["--model", "svig_ti_224_gelu", "--img-size", "64", "--image", str(small_image), "--blocks", "2",
                 "--out", str(out)]) == 0
    assert png_size(out) == graph_figure_size_px(1, ["threshold"]) == (340, 570)


def test_cli_with_checkpoint(tmp_path: Path, small_image: Path) -> None:
    checkpoint = shared_path("fixtures", "svig_ti_checkpoint.pth.tar")
    out = tmp_path / "graph.png"
    assert main(["--model", "vig_ti_224_gelu", "--start-thresh", "0.9", "--dec", "0.005", "--checkpoint",
                 str(checkpoint), "--image", str(small_image), "--blocks", "4", "--out", str(out)]) == 0
    assert png_size(out) == (340, 570)
    mismatch = tmp_path / "mismatch.png"  # a ViG-Ti checkpoint does not fit ViG-S
    assert main(["--model", "vig_s_224_gelu", "--img-size", "64", "--checkpoint", str(checkpoint),
                 "--image", str(small_image), "--out", str(mismatch)]) == 2
    assert not mismatch.exists()


@pytest.mark.parametrize("change, message", [
    ({"--image": "missing.png"}, "image not found"),
    ({"--image": "not_an_image.png"}, "cannot read image"),
    ({"--checkpoint": "missing.pth"}, "checkpoint not found"),
    ({"--out": "no_folder/graph.png"}, "output folder does not exist"),
    ({"--out": "graph.jpg"}, "output must be a .png file"),
    ({"--model": "vig_nonexistent"}, "unknown model 'vig_nonexistent'"),
    ({"--node": "4,0", "--img-size": "64"}, "node 4,0 is off the 4x4 patch grid"),
    ({"--img-size": "0"}, "img_size must be positive"),
    ({"--node": "x"}, "node must be 'Y,X'"),
    ({"--blocks": "12"}, "out of range"),
    ({"--graph": "threshold"}, "give --start-thresh"),
    ({"--dec": "0.1"}, "needs start_thresh"),
    ({"--model": "svig_ti_224_gelu", "--graph": "both"}, "always builds the threshold graph"),
    ({"--start-thresh": "0.9", "--graph": "knn"}, "cannot go with --graph knn"),
    ({"--graph": "ring"}, "argument --graph: invalid choice"),
    ({"--model": "mobilevig_ti", "--graph": "both"}, "builds its own SVGA axial graph"),
])
def test_cli_gives_one_line_errors(tmp_path: Path, small_image: Path, capsys: pytest.CaptureFixture[str],
                                   change: dict[str, str], message: str) -> None:
    (tmp_path / "not_an_image.png").write_text("plain text")
    options = {"--model": "vig_ti_224_gelu", "--image": str(small_image), "--out": "graph.png", **change}
    argv = []
    for flag, value in options.items():
        is_path = flag in ("--image", "--checkpoint", "--out") and value != str(small_image)
        argv += [flag, str(tmp_path / value) if is_path else value]
    try:
        code = main(argv)
    except SystemExit as argument_error:  # argparse's own errors exit from parse_args
        code = argument_error.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vig-visualize: error: ") and message in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "graph.png").exists()


@pytest.mark.parametrize("graph", [{}, {"start_thresh": 0.8, "dec": 0.01}], ids=["knn", "threshold"])
def test_pyramid_blocks_are_drawn_against_their_pooled_keys(tmp_path: Path, small_image: Path, graph: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvig_ti_224_gelu", img_size=64, **graph).eval()
    convs = graph_convs(model)
    assert len(convs) == 12  # Downsamples are not graph blocks
    image = torch.randn(1, 3, 64, 64)
    first, last = capture_graphs(model, image, [0, 11])
    # stage 0: a 16 x 16 map whose keys are pooled by r = 4 into 4 x 4; stage 3: 2 x 2, keys = nodes
    assert (first.grid, first.key_grid, tuple(first.neighbours.shape)) == ((16, 16), (4, 4), (256, 16))
    assert (last.grid, last.key_grid, tuple(last.neighbours.shape)) == ((2, 2), (2, 2), (4, 4))
    assert first.label.endswith(", r = 4")
    features = {}
    hook = convs[0].register_forward_pre_hook(lambda conv, args: features.setdefault("x", args[0]))
    with torch.no_grad():
        model(image)
    hook.remove()
    x = features["x"]
    expected = convs[0].build_graph(x, reduced_keys(x, 4), model.backbone[0][0].relative_pos)[0]
    if expected.dtype != torch.bool:
        expected = torch.zeros(256, 16, dtype=torch.bool).scatter_(1, expected, True)
    assert torch.equal(first.neighbours, expected)
    out = tmp_path / "pyramid.png"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in graph.items()]
    assert main(["--model", "pvig_ti_224_gelu", "--img-size", "64", *flags, "--image", str(small_image),
                 "--blocks", "0,4,11", "--out", str(out)]) == 0
    assert png_size(out) == graph_figure_size_px(3, ["threshold" if graph else "knn"])


def aggregate_over(graph: BlockGraph, x: torch.Tensor, sign: int) -> torch.Tensor:
    """max(0, max over the drawn neighbours j of sign * (x_j - x_i)), per channel: (1, C, H, W) -> same."""
    nodes = x[0].flatten(1)  # (C, N)
    differences = sign * (nodes[:, None, :] - nodes[:, :, None])  # [c, i, j] = sign * (x_j - x_i)
    return differences.masked_fill(~graph.neighbours, float("-inf")).amax(dim=2).clamp(min=0).reshape(x.shape)


@pytest.mark.parametrize("name, kind, size", [("mobilevig_ti", "svga", 160), ("greedyvig_s", "daga", 80)])
@torch.no_grad()
def test_axial_graphs_are_what_each_block_aggregates_over(name: str, kind: str, size: int) -> None:
    """The drawn SVGA / DAGA graph of every block, fed to a max-relative aggregation written out here, gives
    the block's own aggregation exactly (float64): the picture shows the edges the model uses."""
    torch.manual_seed(0)
    model = timm.create_model(name).double().eval()
    ops = axial_graphs(model)
    inputs: dict[int, torch.Tensor] = {}
    handles = [op.register_forward_pre_hook(lambda op, args, i=i: inputs.setdefault(i, args[0]))
               for i, op in enumerate(ops)]
    image = torch.randn(1, 3, size, size, dtype=torch.float64)
    model(image)
    for handle in handles:
        handle.remove()
    graphs = capture_graphs(model, image, list(range(len(ops))))
    kept = candidates = 0
    for graph, op in zip(graphs, ops):
        x = inputs[graph.block]
        axial = svga_mask(*graph.grid, op.k)
        assert graph.kind == kind and graph.grid == tuple(x.shape[-2:])
        assert not graph.neighbours.diagonal().any()
        torch.testing.assert_close(aggregate_over(graph, x, 1 if kind == "daga" else -1), op(x), rtol=0, atol=0)
        if kind == "svga":
            assert torch.equal(graph.neighbours, axial) and graph.candidates is None
        else:
            assert torch.equal(graph.candidates, axial) and not (graph.neighbours & ~axial).any()
            kept, candidates = kept + int(graph.neighbours.sum()), candidates + int(axial.sum())
    assert [g.label.split(",")[:2] for g in graphs] == [[kind.upper(), f" K = {op.k}"] for op in ops]
    if kind == "daga":  # informative only if the distance rule keeps some candidates and drops others
        assert 0 < kept < candidates


@pytest.mark.parametrize("name, blocks, drawn, kind", [("mobilevig_ti", [], 2, "svga"),  # default: both blocks
                                                      ("greedyvig_s", ["--blocks", "6"], 1, "daga")])
def test_cli_draws_the_axial_graphs(tmp_path: Path, small_image: Path, name: str, blocks: list[str], drawn: int,
                                    kind: str) -> None:
    out = tmp_path / "axial.png"
    assert main(["--model", name, "--image", str(small_image), *blocks, "--out", str(out)]) == 0
    assert png_size(out) == graph_figure_size_px(drawn, [kind])
