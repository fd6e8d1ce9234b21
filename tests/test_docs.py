"""The README and the pages under docs/: every link resolves, and every flag a quoted command uses exists.

Links: a relative link names a file of the repository, and its ``#anchor`` (or a bare ``#anchor``) names a heading
of that file, by GitHub's anchor rule. Commands: every ``train.py``, ``vig-*`` and ``benchmarks/*.py`` command in a
code block or an inline code span; each ``--flag`` it passes after the program's name must be one that program's
``--help`` lists (so a renamed or removed flag cannot stay in the docs).
"""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOOLS = {"vig-macs": "macs", "vig-benchmark": "benchmark", "vig-visualize": "visualize", "vig-plot": "plot",
         "vig-make-shards": "make_shards", "vig-export": "export"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def outside_fences(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(match.group(1).strip()) for line in outside_fences(page.read_text(encoding="utf-8"))
            if (match := re.match(r"#{1,6} (.+)", line))}


def links(page: Path) -> list[str]:
    """Targets of the markdown links and images of ``page`` outside code (web addresses left out)."""
    text = "\n".join(outside_fences(page.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", target)]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_names_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.name})")
    assert not broken, f"{page_id(page)}: broken links: {broken}"


def quoted_commands(page: Path) -> list[str]:
    """Every command line of ``page``: fenced and indented code (backslash continuations joined), inline spans."""
    text = page.read_text(encoding="utf-8")
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line.strip())
        else:
            lines += re.findall(r"`([^`\n]+)`", line)
    commands, pending = [], ""
    for line in lines:
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(pending)
            pending = ""
    return [command for command in commands if program_of(command.split()) is not None]


def program_of(tokens: list[str]) -> tuple[str, int] | None:
    """(program, index of its name) of the first train.py / vig-* / benchmarks script among ``tokens``."""
    for index, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        if name == "train.py" or (token.startswith("benchmarks/") and token.endswith(".py")):
            return token if token.startswith("benchmarks/") else "train.py", index
        if name in TOOLS:
            return name, index
        if token == "-m" and index + 1 < len(tokens) and tokens[index + 1].startswith("vig.tools."):
            return "vig-" + tokens[index + 1].split(".")[-1].replace("_", "-"), index + 1
    return None


def flags_of(command: str) -> tuple[str, list[str]]:
    """The program of ``command`` and the ``--flags`` passed to it (up to the next shell operator)."""
    try:
        tokens = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    except ValueError:  # an unbalanced quote in prose: split on blanks
        tokens = command.split()
    program, start = program_of(tokens)
    flags = []
    for token in tokens[start + 1:]:
        if token in {"&&", "||", "|", ";", ">", "2>&1"} or token.endswith(";"):
            break
        if re.match(r"--[A-Za-z][\w-]*", token):
            flags.append(token.split("=", 1)[0])
    return program, flags


@lru_cache(maxsize=None)
def known_flags(program: str) -> frozenset[str]:
    """The ``--flags`` that ``program --help`` lists."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        if program == "train.py":
            from vig.trainer.cli import parse_args
            parse_args(["--help"])
        elif program.startswith("benchmarks/"):
            argv = sys.argv
            sys.argv = [program, "--help"]
            try:
                runpy.run_path(str(ROOT / program), run_name="__main__")
            finally:
                sys.argv = argv
        else:
            module = __import__(f"vig.tools.{TOOLS[program]}", fromlist=["main"])
            module.main(["--help"])
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", out.getvalue()))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_quoted_command_uses_flags_that_exist(page: Path) -> None:
    unknown = []
    for command in quoted_commands(page):
        program, flags = flags_of(command)
        unknown += [f"{program} {flag}" for flag in flags if flag not in known_flags(program)]
    assert not unknown, f"{page_id(page)} quotes flags its commands do not have: {sorted(set(unknown))}"


def test_the_checks_see_commands_and_catch_a_wrong_flag() -> None:
    """The two checks above are not vacuous: they find the docs' commands, and a misspelt flag is caught."""
    readme = quoted_commands(ROOT / "README.md")
    assert any("train.py" in command and "--evaluate" in command for command in readme)
    training = [flags_of(command) for command in quoted_commands(ROOT / "docs" / "training.md")]
    assert sum(program == "train.py" for program, _ in training) >= 10
    assert "--lr" in known_flags("train.py") and "--lr-typo" not in known_flags("train.py")
    assert flags_of("vig-macs vig_ti_224_gelu --img-size 64") == ("vig-macs", ["--img-size"])
    assert flags_of("torchrun --nproc_per_node=8 train.py DIR -b 128 --model-ema && echo --x") == (
        "train.py", ["--model-ema"])
    assert "--start-thresh" in known_flags("vig-macs")
