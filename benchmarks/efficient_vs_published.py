"""CPU forward time of our MobileViG / GreedyViG against the published model files, same weights, same input.

Fetches nothing: pass the directory holding the published ``mobilevig.py`` (SLDGroup/MobileViG, models/) and
``greedyvig.py`` (SLDGroup/GreedyViG, models/), which import timm's old paths. Prints one line per model:
median forward seconds of each and their ratio (published / ours).

    python benchmarks/efficient_vs_published.py --published-dir /tmp/published --models mobilevig_ti greedyvig_s
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import vig  # noqa: F401  (registers the models)

PUBLISHED = {"mobilevig_ti": ("mobilevig", "mobilevig_ti"), "mobilevig_s": ("mobilevig", "mobilevig_s"),
             "mobilevig_m": ("mobilevig", "mobilevig_m"), "mobilevig_b": ("mobilevig", "mobilevig_b"),
             "greedyvig_s": ("greedyvig", "GreedyViG_S"), "greedyvig_m": ("greedyvig", "GreedyViG_M"),
             "greedyvig_b": ("greedyvig", "GreedyViG_B")}


def _load(directory: Path, module: str):
    path = directory / f"{module}.py"
    if not path.is_file():
        sys.exit(f"{path}: not found (fetch the published model file there)")
    spec = importlib.util.spec_from_file_location(f"published_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # timm's register_model looks the module up
    spec.loader.exec_module(loaded)
    return loaded


def _median_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["mobilevig_ti", "greedyvig_s"], choices=sorted(PUBLISHED))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        module, entry = PUBLISHED[name]
        published = getattr(_load(args.published_dir, module), entry)().eval()
        ours = timm.create_model(name).eval()
        ours.load_state_dict(published.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), published(x), rtol=1e-4, atol=1e-4)
        theirs_s, ours_s = _median_seconds(published, x, args.repeats), _median_seconds(ours, x, args.repeats)
        print(f"{name}: published {theirs_s * 1e3:.1f} ms, ours {ours_s * 1e3:.1f} ms, "
              f"ratio published/ours {theirs_s / ours_s:.2f} (batch {args.batch_size}, {args.img_size} px, "
              f"{args.threads} thread(s), median of {args.repeats})")


if __name__ == "__main__":
    main()
