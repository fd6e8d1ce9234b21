"""The README's table of contents lists every section, in order, with working anchors; the front page stays short;
the published MobileViG / GreedyViG recipe of docs/models.md parses."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every ``##`` / ``###`` heading outside fenced code blocks, in order."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{2,3}) (.+)", line)):
            found.append((len(match.group(1)), match.group(2).strip()))
    return found


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def contents_entries(text: str) -> list[tuple[int, str, str]]:
    """(level, title, anchor) of each link line under '## Contents' (level 3 when indented)."""
    block = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    return [(3 if line.startswith("  ") else 2, title, target)
            for line in block.splitlines()
            for title, target in re.findall(r"^\s*- \[(.+)\]\(#([^)]+)\)$", line)]


def test_contents_lists_every_heading_in_order_with_its_anchor() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = [(level, title, anchor(title)) for level, title in headings(text) if title != "Contents"]
    assert contents_entries(text) == expected


def test_front_page_fits_on_a_page() -> None:
    """The README is the front page (the two commands, install, a tour, links); the detail lives under docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_anchor_follows_github_rules() -> None:
    assert anchor("Training and evaluation (`train.py`)") == "training-and-evaluation-trainpy"
    assert anchor("gcn_lib: graph construction and graph convolutions") == "gcn_lib-graph-construction-and-graph-convolutions"
    assert anchor("Batch-graph head (`bgnn`, `bgnn_mobilenetv3_small_100`)") == "batch-graph-head-bgnn-bgnn_mobilenetv3_small_100"


def test_published_efficient_recipe_parses_and_scales_the_learning_rate_as_published(tmp_path: Path) -> None:
    """docs/models.md's MobileViG / GreedyViG recipe: its flags parse, and lr = 2e-3 x global batch / 1024."""
    import shlex

    from vig.trainer.cli import parse_args
    from vig.trainer.run import resolve_lr

    text = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    start = text.index("torchrun --nproc_per_node=8 train.py <path_to_imagenet> --model greedyvig_s")
    command = text[start:text.index("--output <dir>", start) + len("--output <dir>")].replace("\\\n", " ")
    teacher = tmp_path / "regnety_160.pth"
    teacher.touch()  # only its existence is checked while parsing
    argv = shlex.split(command.replace("<path_to_imagenet>", "imagenet").replace("<regnety_160.pth>", str(teacher))
                       .replace("<dir>", str(tmp_path)))
    assert argv[:3] == ["torchrun", "--nproc_per_node=8", "train.py"]
    config = parse_args(argv[3:])
    args = argparse.Namespace(**config.to_flags())
    assert (args.model, args.batch_size, args.epochs, args.warmup_epochs, args.weight_decay) == ("greedyvig_s", 128,
                                                                                                300, 20, 0.05)
    assert (args.kd_model_name, args.kd_distill_type, args.kd_token_distill_type) == ("regnety_160", "token", "hard")
    assert args.task_loss_weight == 0.5 and args.model_ema_decay == 0.99996
    assert (resolve_lr(config.optimiser, config.data.batch_size, 8) == 2e-3
            and resolve_lr(config.optimiser, config.data.batch_size, 2) == 5e-4)
