"""Logit distillation changes what the student learns: the same run (same seed, data, student) with and without
the teacher ends in measurably different weights, on one and on two gloo processes, and the teacher's term
is the whole difference (weighted 0, the run repeats the one without a teacher bit for bit). A loss that
dropped the teacher's term would leave the two runs equal."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from tests.test_train_distributed import _launcher
from tests.train_helpers import make_image_folder, run_train

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")

STUDENT = ["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2", "--img-size", "32", "-b", "8",
           "-j", "0", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-2", "--seed", "5"]
# the smallest change the teacher makes that counts as "measurable": far above float32 rounding (~1e-7)
MEASURABLE = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8, "c": 8},
                                                               "val": {"a": 2, "b": 2, "c": 2}}, size=32)


@pytest.fixture(scope="module")
def teacher(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test_vit trained by train.py for two epochs on the same images."""
    out = tmp_path_factory.mktemp("teacher")
    torch.set_num_threads(1)
    assert train.main([str(data), "--model", "test_vit", "--img-size", "32", "-b", "8", "-j", "0", "--epochs", "2",
                       "--warmup-epochs", "0", "--lr", "1e-3", "--output", str(out), "--experiment", "t"]) == 0
    return out / "t" / "last.pth.tar"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "last.pth.tar", weights_only=True)["state_dict"]


def _largest_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key].double() - second[key].double()).abs().max()) for key in first
               if first[key].is_floating_point())


def _kd(teacher: Path, *weights: str) -> list[str]:
    return ["--kd-model-name", "test_vit", "--kd-pretrained-path", str(teacher), "--kd-distill-type", "logit",
            *weights]


def test_logit_distillation_changes_the_student_on_one_process(tmp_path: Path, data: Path, teacher: Path) -> None:
    common = [str(data), *STUDENT, "--output", str(tmp_path)]
    assert train.main([*common, "--experiment", "plain"]) == 0
    assert train.main([*common, *_kd(teacher), "--experiment", "kd"]) == 0
    assert train.main([*common, *_kd(teacher, "--distill-loss-weight", "0", "--task-loss-weight", "1"),
                       "--experiment", "kd0"]) == 0
    plain, distilled, weightless = (_weights(tmp_path / name) for name in ("plain", "kd", "kd0"))
    assert _largest_difference(distilled, plain) > MEASURABLE
    # the control: everything but the teacher's term is the plain run's, so the difference above is that term
    assert _largest_difference(weightless, plain) == 0


@pytest.mark.slow
def test_logit_distillation_changes_the_student_on_two_gloo_processes(tmp_path: Path, data: Path,
                                                                      teacher: Path) -> None:
    common = [str(data), *STUDENT, "-b", "4", "--output", str(tmp_path)]
    for name, extra in (("plain", []), ("kd", _kd(teacher))):
        result = run_train([*common, *extra, "--experiment", name], launcher=_launcher("torchrun"))
        assert result.returncode == 0, result.stderr[-4000:]
        assert "by 2 process(es)" in result.stderr
    assert _largest_difference(_weights(tmp_path / "kd"), _weights(tmp_path / "plain")) > MEASURABLE
