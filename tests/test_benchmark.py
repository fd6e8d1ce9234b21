"""vig.tools.benchmark on tiny CPU sizes: rows, JSON, the --no-graph control and argument errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import vig  # noqa: F401  (registers the models)
from gcn_lib import DynConv2d, interleave_channels
from vig.tools.benchmark import main, parse_args, remove_graph, rows_table


def test_remove_graph_zeroes_every_aggregation() -> None:
    model = timm.create_model("vig_ti_224_gelu", img_size=64).eval()
    assert remove_graph(model) == 12
    conv = next(m for m in model.modules() if isinstance(m, DynConv2d))
    x = torch.randn(2, 192, 4, 4)
    nodes = x.reshape(2, 192, 16, 1)
    expected = conv.gconv.nn(interleave_channels(nodes, torch.zeros_like(nodes))).reshape(2, 384, 4, 4)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [[], ["--no-graph"], ["--start-thresh", "0.8", "--dec", "0.01"]])
def test_model_mode_writes_rows(tmp_path: Path, capsys, extra: list[str]) -> None:
    out = tmp_path / "rows.json"
    argv = ["--model", "vig_ti_224_gelu", "--img-size", "32", "--batch-size", "2", "--infer-batch-size", "2",
            "--iters", "1", "--warmup", "0", "--json", str(out), *extra]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == ["train", "infer"]
    assert all(r["images_per_s"] > 0 for r in rows)
    expected_graph = {"--no-graph": "none", "--start-thresh": "threshold"}.get(extra[0] if extra else "", "knn")
    assert {r["graph"] for r in rows} == {expected_graph}
    assert "images_per_s" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["vig_ti_224_gelu", "svig_ti_224_gelu"])
def test_dec_default_is_the_models(name: str) -> None:
    """--start-thresh without --dec builds the thresholds the model itself builds for start_thresh alone."""
    args = parse_args(["--model", name, "--start-thresh", "0.8"])
    alone = timm.create_model(name, img_size=32, start_thresh=0.8)
    assert args.dec == alone.dec
    thresholds = [block[0].graph_conv.threshold for block in alone.backbone]
    given = timm.create_model(name, img_size=32, start_thresh=args.start_thresh, dec=args.dec)
    assert [block[0].graph_conv.threshold for block in given.backbone] == thresholds


def test_graph_mode_times_each_implementation(tmp_path: Path) -> None:
    out = tmp_path / "graph.json"
    argv = ["--mode", "graph", "--batch-size", "2", "--channels", "8", "--nodes", "16", "--iters", "1",
            "--warmup", "0", "--json", str(out)]
    assert main(argv) == 0
    impls = [r["impl"] for r in json.loads(out.read_text())["rows"]]
    assert {"dense", "scatter"} <= set(impls)


def test_unknown_model_is_one_line(capsys) -> None:
    assert main(["--model", "vig_tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vig-benchmark: error: unknown model 'vig_tiny'")


def test_rows_table_aligns_columns() -> None:
    table = rows_table([{"a": 1, "bb": "x"}, {"a": 123}]).splitlines()
    assert table[0].split() == ["a", "bb"] and table[2].split() == ["123"]
    assert table[0].index("bb") == table[1].index("x")
