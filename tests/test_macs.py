"""``vig-macs``: the parameter / MAC table and its one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from vig.complexity import count_macs, count_parameters
from vig.tools.macs import main

ROOT = Path(__file__).resolve().parents[1]


def _table(output: str) -> dict[str, str]:
    header, row = output.strip().splitlines()
    names = [name.strip() for name in header.split("  ") if name.strip()]
    values = [value.strip() for value in row.split("  ") if value.strip()]
    assert len(names) == len(values)
    return dict(zip(names, values))


def test_table_for_a_small_threshold_model(capsys: pytest.CaptureFixture) -> None:
    assert main(["vig_ti_224_gelu", "--start-thresh", "0.9", "--dec", "0.02", "--img-size", "64",
                 "--num-classes", "10"]) == 0
    captured = capsys.readouterr()
    table = _table(captured.out)
    model = timm.create_model("vig_ti_224_gelu", start_thresh=0.9, dec=0.02, img_size=64, num_classes=10)
    assert table["model"] == "vig_ti_224_gelu"
    assert table["graph"] == "threshold start 0.9 dec 0.02"
    assert table["img"] == "64" and table["classes"] == "10"
    assert table["params (M)"] == f"{count_parameters(model) / 1e6:.2f}"
    # Almost all MACs are per position: 4x4 instead of 14x14 positions scale the published 1.31 G.
    assert float(table["MACs (G)"]) == pytest.approx(1.31 * 16 / 196, abs=0.01)
    assert captured.err == ""


def test_count_macs_of_a_convolution() -> None:
    layer = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(layer, 10) == 3 * 8 * 9 * 10 * 10
    assert layer.training


def test_count_parameters_counts_every_element() -> None:
    layer = torch.nn.Conv2d(4, 8, 3)
    assert count_parameters(layer) == 4 * 8 * 9 + 8


@pytest.mark.parametrize("argv, expected", [
    (["vig_t_224_gelu"], "unknown model 'vig_t_224_gelu'; did you mean vig_ti_224_gelu"),
    (["no_such_network_at_all"], "unknown model 'no_such_network_at_all'"),
    (["vig_ti_224_gelu", "--dec", "0.03"], "needs start_thresh"),
    (["vig_ti_224_gelu", "--start-thresh", "1.5"], "below 1"),
])
def test_user_mistakes_give_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vig-macs: error: ") and expected in captured.err
    assert captured.err.count("\n") == 1


def test_module_entry_point_exits_non_zero_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "vig.tools.macs", "svig_tiny"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and "unknown model 'svig_tiny'" in result.stderr
