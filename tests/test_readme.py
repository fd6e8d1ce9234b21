"""The README's table of contents lists every section and subsection, in order, with working anchors."""
from __future__ import annotations

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


def test_anchor_follows_github_rules() -> None:
    assert anchor("Training and evaluation (`train.py`)") == "training-and-evaluation-trainpy"
    assert anchor("gcn_lib: graph construction and graph convolutions") == "gcn_lib-graph-construction-and-graph-convolutions"
    assert anchor("Batch-graph head (`bgnn`, `bgnn_mobilenetv3_small_100`)") == "batch-graph-head-bgnn-bgnn_mobilenetv3_small_100"
