"""CPU forward time (or torchprofile MACs) of our MobileViG / GreedyViG against the published model files.

Fetches nothing: pass the directory holding the published ``mobilevig.py`` (SLDGroup/MobileViG, models/) and
``greedyvig.py`` (SLDGroup/GreedyViG, models/), which import timm's old paths. Prints one line per model:
median forward seconds of each and their ratio (published / ours), same weights, same input. With ``--macs``:
the MACs torchprofile counts for one image of each, and per operator where the two counts differ.

    python benchmarks/efficient_vs_published.py --published-dir /tmp/published --models mobilevig_ti greedyvig_s
    python benchmarks/efficient_vs_published.py --published-dir /tmp/published --macs --models greedyvig_s
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torchprofile import profile_macs

from vig.models import greedyvig, mobilevig

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


def _macs_by_operator(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    """torchprofile's MACs of one eval forward, summed per operator (aten::_convolution, aten::mul, ...)."""
    counts: collections.Counter = collections.Counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # operators without a rule, tracer warnings
        for node, macs in profile_macs(model.eval(), x, reduction=None).items():
            counts[node.operator] += macs
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["mobilevig_ti", "greedyvig_s"], choices=sorted(PUBLISHED))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--macs", action="store_true", help="count MACs (torchprofile, one image) instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        module, entry = PUBLISHED[name]
        published = getattr(_load(args.published_dir, module), entry)().eval()
        # our entry point itself: the published file registers mobilevig_* in timm under our names
        ours = getattr(mobilevig if name.startswith("mobilevig") else greedyvig, name)().eval()
        if args.macs:
            theirs_ops, ours_ops = _macs_by_operator(published, x[:1]), _macs_by_operator(ours, x[:1])
            print(f"{name}: published {sum(theirs_ops.values()):,} MACs, ours {sum(ours_ops.values()):,} MACs "
                  f"({args.img_size} px)")
            for op in sorted(set(theirs_ops) | set(ours_ops)):
                if theirs_ops[op] != ours_ops[op]:
                    print(f"  {op}: published {theirs_ops[op]:,}, ours {ours_ops[op]:,}")
            continue
        ours.load_state_dict(published.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), published(x), rtol=1e-4, atol=1e-4)
        theirs_s, ours_s = _median_seconds(published, x, args.repeats), _median_seconds(ours, x, args.repeats)
        print(f"{name}: published {theirs_s * 1e3:.1f} ms, ours {ours_s * 1e3:.1f} ms, "
              f"ratio published/ours {theirs_s / ours_s:.2f} (batch {args.batch_size}, {args.img_size} px, "
              f"{args.threads} thread(s), median of {args.repeats})")


if __name__ == "__main__":
    main()
