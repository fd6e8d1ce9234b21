"""Every mistake is one whole line: train.py and every vig-* tool fed each class of bad input (missing file,
text file, truncated zip, pickle with code, wrong model, wrong class count, bad flag values) exit with
status 1 or 2 and print exactly one line on stderr, without a traceback, a cut sentence or torch's advice
to load the file unsafely. The tools' main() run in-process."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch

import train
import vig.models  # noqa: F401  (registers the models)
from tests.train_helpers import make_image_folder
from vig.tools import benchmark, export, macs, make_shards, plot, visualize

TOOLS: dict[str, Callable[[list[str]], int]] = {
    "train.py": train.main, "vig-macs": macs.main, "vig-benchmark": benchmark.main, "vig-visualize": visualize.main,
    "vig-plot": plot.main, "vig-make-shards": make_shards.main, "vig-export": export.main,
}
MODEL = "vig_ti_cifar"
# torch's words that a cut or quoted-whole exception message brings along; none belongs in a one-line error
ADVICE = ("If you are seeing this error", "weights_only=False", "weights_only set to False", "Re-running torch.load",
          "WeightsUnpickler error", "Please file an issue")


class _RunsCode:
    """Unpickling this object would call ``exec``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file of each bad class, a small image folder and an image."""
    root = tmp_path_factory.mktemp("bad")
    data = make_image_folder(root / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}, size=32)
    good_state = {"epoch": 0, "arch": MODEL, "state_dict": timm.create_model(MODEL, num_classes=2).state_dict()}
    truncated = root / "truncated.pth.tar"
    torch.save(good_state, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    code = root / "code.pth.tar"
    torch.save({**good_state, "args": _RunsCode(root / "code-ran")}, code)
    code_pickle = root / "code.pkl"
    with open(code_pickle, "wb") as handle:
        pickle.dump({"state_dict": {}, "args": _RunsCode(root / "code-ran")}, handle, protocol=2)
    wrong_model = root / "wrong-model.pth.tar"
    torch.save({"epoch": 0, "arch": "test_resnet",
                "state_dict": timm.create_model("test_resnet", num_classes=2).state_dict()}, wrong_model)
    wrong_classes = root / "wrong-classes.pth.tar"
    torch.save({"epoch": 0, "arch": MODEL,
                "state_dict": timm.create_model(MODEL, num_classes=1).state_dict()}, wrong_classes)
    text = root / "notes.txt"
    text.write_text("model: vig_ti_cifar\nlr: 0.002\n")
    return {"missing": root / "nope" / "missing.pth.tar", "text": text, "truncated": truncated, "code": code,
            "code_pickle": code_pickle, "wrong_model": wrong_model, "wrong_classes": wrong_classes,
            "data": data, "image": data / "val" / "a" / "0.png", "out": root / "out", "marker": root / "code-ran"}


def _train(bad: str) -> list[str]:
    return ["{data}", "--model", MODEL, "--img-size", "32", "-b", "4", "-j", "0", "--epochs", "1",
            "--output", "{out}", "--experiment", bad, "--initial-checkpoint", "{" + bad + "}"]


CHECKPOINTS = ("missing", "text", "truncated", "code", "code_pickle", "wrong_model", "wrong_classes")
CASES: list[tuple[str, str, list[str]]] = [
    *[("train.py", bad, _train(bad)) for bad in CHECKPOINTS],
    ("train.py", "resume-truncated", ["{data}", "--model", MODEL, "--output", "{out}", "--resume", "{truncated}"]),
    ("train.py", "missing-data", ["{missing}", "--model", MODEL]),
    ("train.py", "text-data", ["{text}", "--model", MODEL]),
    ("train.py", "wrong-model-name", ["{data}", "--model", "vig_tiny_nope"]),
    ("train.py", "bad-lr", ["{data}", "--lr", "fast"]),
    ("train.py", "bad-batch", ["{data}", "-b", "0"]),
    ("train.py", "bad-img-size", ["{data}", "--img-size", "-3"]),
    ("train.py", "bad-classes", ["{data}", "--model", MODEL, "--num-classes", "1", "--output", "{out}"]),
    *[("vig-visualize", bad, ["--model", MODEL, "--checkpoint", "{" + bad + "}", "--image", "{image}", "--num-classes", "2",
                              "--out", "{out}/v.png"]) for bad in CHECKPOINTS],
    ("vig-visualize", "missing-image", ["--model", MODEL, "--image", "{missing}", "--out", "{out}/v.png"]),
    ("vig-visualize", "text-image", ["--model", MODEL, "--image", "{text}", "--out", "{out}/v.png"]),
    ("vig-visualize", "truncated-image", ["--model", MODEL, "--image", "{truncated}", "--out", "{out}/v.png"]),
    ("vig-visualize", "bad-node", ["--model", MODEL, "--image", "{image}", "--node", "a,b", "--out", "{out}/v.png"]),
    ("vig-visualize", "wrong-model-name", ["--model", "vig_nope", "--image", "{image}", "--out", "{out}/v.png"]),
    *[("vig-export", bad, [MODEL, "{out}/m.onnx", "--checkpoint", "{" + bad + "}"]) for bad in CHECKPOINTS],
    ("vig-export", "wrong-model-name", ["vig_nope", "{out}/m.onnx"]),
    ("vig-export", "bad-batch", [MODEL, "{out}/m.onnx", "--batch-size", "0"]),
    ("vig-export", "bad-kwargs", [MODEL, "{out}/m.onnx", "--model-kwargs", "depth"]),
    *[("vig-plot", bad, ["{" + bad + "}", "--out", "{out}/p.png"]) for bad in ("missing", "text", "truncated",
                                                                                 "code_pickle")],
    ("vig-plot", "bad-out", ["{text}", "--out", "{out}/p.txt"]),
    ("vig-plot", "no-flags", []),
    *[("vig-make-shards", bad, ["{" + bad + "}", "{out}/shards-" + bad]) for bad in ("missing", "text", "truncated")],
    ("vig-make-shards", "bad-shard-size", ["{data}", "{out}/shards-size", "--shard-size", "0"]),
    ("vig-make-shards", "bad-split", ["{data}", "{out}/shards-split", "--splits", "nope"]),
    ("vig-macs", "wrong-model-name", ["vig_nope"]),
    ("vig-macs", "bad-img-size", [MODEL, "--img-size", "0"]),
    ("vig-macs", "bad-threshold", [MODEL, "--start-thresh", "1.5"]),
    ("vig-macs", "bad-classes", [MODEL, "--num-classes", "-2"]),
    ("vig-benchmark", "wrong-model-name", ["--model", "vig_nope"]),
    ("vig-benchmark", "bad-iters", ["--model", MODEL, "--iters", "0", "--device", "cpu"]),
    ("vig-benchmark", "bad-batch", ["--model", MODEL, "--batch-size", "-1", "--device", "cpu"]),
    ("vig-benchmark", "bad-device", ["--model", MODEL, "--device", "tpu"]),
]


def whole_line_problems(line: str) -> list[str]:
    """What makes an error line not whole: torch's advice, unbalanced brackets (a quote cut short), a dangling end."""
    problems = [f"contains {phrase!r}" for phrase in ADVICE if phrase in line]
    for opening, closing in ("()", "[]", "{}"):
        if line.count(opening) != line.count(closing):
            problems.append(f"unbalanced {opening}{closing}")
    if re.search(r"(,|:|\bthe|\ba|\ban|\bof|\bto|\bis|\bhigh)\)?$", line):
        problems.append("ends mid-sentence")
    return problems


@pytest.mark.usefixtures("fast_in_process_runs")
@pytest.mark.parametrize(("tool", "case", "argv"), CASES, ids=[f"{tool}-{case}" for tool, case, _ in CASES])
def test_every_mistake_is_one_whole_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str], tool: str,
                                         case: str, argv: list[str]) -> None:
    files["out"].mkdir(exist_ok=True)
    concrete = [item.format(**{key: str(value) for key, value in files.items()}) for item in argv]
    capsys.readouterr()
    try:
        status = TOOLS[tool](concrete)
    except SystemExit as exit_:  # argparse's own exit, for a tool whose parser is not the one-line one
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status in (1, 2), (status, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert re.match(r"^(\S+: )?error: ", lines[0]), lines[0]
    assert not whole_line_problems(lines[0]), (whole_line_problems(lines[0]), lines[0])
    assert not files["marker"].exists(), "a checkpoint ran code"
