"""Shared pieces of the trainer tests: tiny ImageFolder trees and running train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, split_sizes: dict[str, dict[str, int]], size: int = 24, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png with the given image counts; class c is tinted by its index."""
    rng = np.random.default_rng(seed)
    for split, classes in split_sizes.items():
        for class_index, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                pixels[..., class_index % 3] = 255 - 40 * (class_index // 3)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.png")
    return root


def child_env() -> dict[str, str]:
    """Environment for train.py children: one thread each, the repository importable, no inherited ranks."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def run_train(argv: list[str], launcher: list[str] | None = None, timeout: float = 300,
              cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run train.py (optionally under a launcher prefix) and return the completed process (text output)."""
    command = [sys.executable, *(launcher or []), str(REPO_ROOT / "train.py"), *argv]
    return subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    """The JSON object on the last line of train.py --evaluate's standard output."""
    return json.loads(stdout.strip().splitlines()[-1])
