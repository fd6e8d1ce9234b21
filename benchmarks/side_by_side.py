"""Side by side on the CPU: our graph models against the published model files and timm's usual alternatives.

Every figure is its own process (a fresh allocator and thread pool), and the figures run in interleaved rounds
(round 1: every figure once, round 2: every figure again, ...), so that a change in the machine's load hits all
of them alike; each cell prints the median over rounds and the spread (min-max). Speed: images per second of
an inference forward (eval, no_grad) and of a training step (forward, cross-entropy, backward, AdamW step), at
one batch size, after warm-up. Memory: the peak resident memory a forward adds (eval, no_grad, batch 2) over
what the process held before it, for several image sizes.

    python benchmarks/side_by_side.py --rounds 2                               # ours and timm's models
    python benchmarks/side_by_side.py --published-dir /tmp/published --rounds 2  # and the published files
    python benchmarks/side_by_side.py --memory-only                            # the memory table only

``--published-dir`` holds the authors' files as they are: ``vig_pytorch/`` (huawei-noah/Efficient-AI-Backbones:
``vig.py``, ``pyramid_vig.py`` and their ``gcn_lib/``), ``svig/`` (IsmaelElsharkawi/SViG: ``vig.py`` and its
``gcn_lib/``), ``mobilevig.py`` (SLDGroup/MobileViG, models/) and ``greedyvig.py`` (SLDGroup/GreedyViG, models/).
They run in their own processes with the published folder first on ``sys.path``; nothing of theirs is copied
here. A published file that is absent leaves its cells empty. Shims, in the published processes only: NumPy's
``np.float`` (gone since NumPy 1.24; pyramid_vig's position embedding), empty ``cupy`` / ``cupyx`` modules (SViG
imports them and never calls them), and SViG's one call of ``torch_scatter.scatter``, which has no build for
current PyTorch, answered by torch_geometric's ``scatter`` (same arguments, same max reduction). SViG's file
also needs SciPy (``scipy.stats.norm.ppf``), which this project does not install: ``pip install scipy``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SVIG = {"start_thresh": 0.89, "dec": 0.03}
# row -> (our model, our kwargs, published (file, builder, builder kwargs) or None)
ROWS: dict[str, tuple[str, dict, tuple[str, str, dict] | None]] = {
    "vig_ti_224_gelu": ("vig_ti_224_gelu", {}, ("vig_pytorch/vig.py", "vig_ti_224_gelu", {})),
    "svig_ti (0.89 / 0.03, at init)": ("vig_ti_224_gelu", SVIG, (
        "svig/vig.py", "vig_ti_224_gelu", {"starting_threshold": SVIG["start_thresh"], "decrement": SVIG["dec"]})),
    "pvig_ti_224_gelu": ("pvig_ti_224_gelu", {}, ("vig_pytorch/pyramid_vig.py", "pvig_ti_224_gelu", {})),
    "mobilevig_ti": ("mobilevig_ti", {}, ("mobilevig.py", "mobilevig_ti", {})),
    "greedyvig_s": ("greedyvig_s", {}, ("greedyvig.py", "GreedyViG_S", {})),
}
TIMM = ("deit_tiny_patch16_224", "resnet18", "mobilenetv3_large_100")
MEMORY_MODELS = ("pvig_ti_224_gelu", "vig_ti_224_gelu")
MEMORY_SIZES = (224, 448, 672, 896)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build_ours(name: str, kwargs: dict, img_size: int | None = None) -> Any:
    import timm

    import vig.models  # noqa: F401  (registers the models)

    extra = dict(kwargs)
    if img_size is not None:
        extra["img_size"] = img_size
    return timm.create_model(name, pretrained=False, **extra)


def _shim_published_imports() -> None:
    """The shims the module docstring lists, for the published files' imports that current libraries lack."""
    import types

    import numpy

    if not hasattr(numpy, "float"):  # pyramid_vig's pos_embed uses np.float, gone since NumPy 1.24
        numpy.float = float
    for unused in ("cupy", "cupyx"):  # SViG's torch_edge imports them and calls neither
        sys.modules.setdefault(unused, types.ModuleType(unused))
    if importlib.util.find_spec("torch_scatter") is None:  # SViG's MRConv2d: scatter(src, index, dim, dim_size, reduce)
        from torch_geometric.utils import scatter

        sys.modules["torch_scatter"] = types.ModuleType("torch_scatter")
        sys.modules["torch_scatter"].scatter = scatter


def _build_published(directory: Path, file: str, builder: str, kwargs: dict) -> Any:
    """Import the authors' file from ``directory / file`` as it is and call its builder; their folder goes first
    on sys.path, so that their own imports (their ``gcn_lib``) resolve to their code."""
    _shim_published_imports()
    path = directory / file
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"published_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, builder)(**kwargs)


def worker(spec: dict) -> dict:
    """One figure in this process: ``spec`` names impl (ours / published / timm), model, mode, batch, size."""
    import torch

    torch.manual_seed(0)
    if spec["impl"] == "ours":
        model = _build_ours(spec["model"], spec.get("kwargs", {}))
    elif spec["impl"] == "published":
        model = _build_published(Path(spec["published_dir"]), *spec["published"])
    else:
        import timm
        model = timm.create_model(spec["model"], pretrained=False)
    batch, size = spec["batch"], spec["size"]
    images = torch.randn(batch, 3, spec.get("height", size), spec.get("width", size))
    if spec["mode"] == "memory":
        model.eval()
        with torch.no_grad():
            before = _rss_mib()
            start = time.perf_counter()
            out = model(images)
            seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        shapes = [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]
        return {"added_mib": peak - before, "seconds": seconds, "shapes": shapes}
    timings = []
    if spec["mode"] == "infer":
        model.eval()
        with torch.no_grad():
            for _ in range(spec["warmup"] + spec["steps"]):
                start = time.perf_counter()
                model(images)
                timings.append(time.perf_counter() - start)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        targets = torch.randint(0, 1000, (batch,))
        for _ in range(spec["warmup"] + spec["steps"]):
            start = time.perf_counter()
            out = model(images)
            logits = out[0] if isinstance(out, tuple) else out
            if logits.dim() > 2:
                logits = logits.flatten(1)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            timings.append(time.perf_counter() - start)
    return {"images_per_s": batch / statistics.median(timings[spec["warmup"]:])}


def _run(spec: dict, threads: int, timeout: float) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        print(f"  {spec['impl']} {spec['model']} {spec['mode']} failed: {done.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _ratio(ours: list[float], theirs: list[float]) -> str:
    """Median and range of the per-round ratios ours / theirs (same round, so the same load)."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _timm_names(args: argparse.Namespace) -> list[str]:
    return [name for name in TIMM if not args.rows or name in args.rows]


def speed_table(args: argparse.Namespace) -> None:
    specs: dict[tuple[str, str, str], dict] = {}
    base = {"batch": args.batch, "size": 224, "warmup": args.warmup, "steps": args.steps}
    for row, (model, kwargs, published) in ROWS.items():
        if args.rows and row.split()[0] not in args.rows:
            continue
        for mode in ("infer", "train"):
            specs[(row, "ours", mode)] = dict(base, impl="ours", model=model, kwargs=kwargs, mode=mode)
            if args.published_dir and published and (args.published_dir / published[0]).is_file():
                specs[(row, "published", mode)] = dict(base, impl="published", model=model, mode=mode,
                                                       published=list(published),
                                                       published_dir=str(args.published_dir))
    for name in _timm_names(args):
        for mode in ("infer", "train"):
            specs[(name, "timm", mode)] = dict(base, impl="timm", model=name, mode=mode)
    results: dict[tuple[str, str, str], list[float]] = {key: [] for key in specs}
    for round_index in range(args.rounds):
        for key, spec in specs.items():
            out = _run(spec, args.threads, args.timeout)
            if out is not None:
                results[key].append(out["images_per_s"])
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr)
        _print_speed(args, results, round_index + 1)


def _print_speed(args: argparse.Namespace, results: dict[tuple[str, str, str], list[float]], rounds: int) -> None:
    """The speed table over the rounds done so far (printed after every round, so a long run shows its state)."""
    deit = {mode: results.get(("deit_tiny_patch16_224", "timm", mode), []) for mode in ("infer", "train")}
    print(f"\nimages/s, batch {args.batch}, 224 px, {args.threads} threads, {rounds} interleaved round(s): "
          "median (min-max); ratios per round", flush=True)
    print("| model | ours infer | published infer | ours / published infer | ours train | published train "
          "| ours / published train | ours / DeiT-Ti infer | ours / DeiT-Ti train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        if (row, "ours", "infer") not in results:
            continue
        get = lambda impl, mode: results.get((row, impl, mode), [])  # noqa: E731
        print(f"| {row} | {_cell(get('ours', 'infer'))} | {_cell(get('published', 'infer'))} "
              f"| {_ratio(get('ours', 'infer'), get('published', 'infer'))} | {_cell(get('ours', 'train'))} "
              f"| {_cell(get('published', 'train'))} | {_ratio(get('ours', 'train'), get('published', 'train'))} "
              f"| {_ratio(get('ours', 'infer'), deit['infer'])} | {_ratio(get('ours', 'train'), deit['train'])} |")
    for name in _timm_names(args):
        print(f"| timm {name} | {_cell(results[(name, 'timm', 'infer')])} | | | "
              f"{_cell(results[(name, 'timm', 'train')])} | | | | |", flush=True)


def memory_table(args: argparse.Namespace) -> None:
    print(f"\npeak resident memory a forward adds (MiB; eval, no_grad, batch 2, {args.threads} threads, "
          "pyramid: a 224-px model on larger images), and seconds per forward")
    print("| model | " + " | ".join(f"{size} px" for size in MEMORY_SIZES) + " |")
    print("|---|" + "---|" * len(MEMORY_SIZES))
    for model in MEMORY_MODELS:
        cells = []
        for size in MEMORY_SIZES:
            # isotropic ViG needs its position embedding at the input size; pyramid ViG resizes its own
            kwargs = {"img_size": size} if model.startswith("vig_") else {}
            out = _run({"impl": "ours", "model": model, "kwargs": kwargs, "mode": "memory", "batch": 2, "size": size},
                       args.threads, args.timeout)
            cells.append("-" if out is None else f"+{out['added_mib']:.0f} ({out['seconds']:.1f} s)")
        print(f"| {model} | " + " | ".join(cells) + " |")
    out = _run({"impl": "ours", "model": "pvig_ti_224_gelu", "kwargs": {"features_only": True}, "mode": "memory",
                "batch": 1, "size": 0, "height": 800, "width": 1216}, args.threads, args.timeout)
    if out is not None:
        print(f"\nfeatures_only pvig_ti_224_gelu, 800 x 1216, batch 1: +{out['added_mib']:.0f} MiB, "
              f"{out['seconds']:.1f} s, maps {out['shapes']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published-dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one figure's process may take")
    parser.add_argument("--rows", nargs="+", default=None, help=f"only these rows (first word) and timm models: {', '.join(ROWS)}, {', '.join(TIMM)}")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    mistake = None
    if args.memory_only and args.speed_only:
        mistake = "--memory-only and --speed-only exclude each other"
    elif args.published_dir is not None and not args.published_dir.is_dir():
        mistake = f"--published-dir {args.published_dir}: not a directory"
    elif args.rounds < 1 or args.steps < 1 or args.batch < 1 or args.threads < 1:
        mistake = "--rounds, --steps, --batch and --threads must be >= 1"
    if mistake is not None:
        print(f"side_by_side.py: error: {mistake}", file=sys.stderr)
        return 2
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    if not args.memory_only:
        speed_table(args)
    if not args.speed_only:
        memory_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
