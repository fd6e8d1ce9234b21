"""Parameters and MACs of a model: ``python -m vig.profile MODEL [--start-thresh T --dec D] [--img-size S] [--num-classes N]``.

MACs (multiply-accumulates of one image) are counted by torchprofile on a traced forward pass in
eval mode. Any timm model name works; the ViG / SViG names are registered by ``import vig``.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from typing import Any, Sequence

import timm
import torch
from torch import nn
from torchprofile import profile_macs

import vig  # noqa: F401  (registers the ViG / SViG models with timm)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not), without a forward pass."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a (1, in_chans, img_size, img_size) image in eval mode.

    torchprofile skips operators it has no rule for (graph construction's comparisons, max, ...);
    its warnings about them and the tracer's are silenced here.
    """
    image = torch.randn(1, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No handlers found")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            with torch.no_grad():
                return int(profile_macs(model, image))
    finally:
        model.train(was_training)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name in ("start_thresh", "dec", "img_size", "num_classes"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vig.profile", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="timm model name, e.g. vig_ti_224_gelu or svig_ti_224_gelu")
    parser.add_argument("--start-thresh", type=float, default=None,
                        help="similarity threshold of the first block (switches to the threshold graph)")
    parser.add_argument("--dec", type=float, default=None, help="threshold decrement per block")
    parser.add_argument("--img-size", type=int, default=None, help="square image size (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    known = timm.list_models()
    if args.model not in known:
        close = difflib.get_close_matches(args.model, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return _fail(f"unknown model {args.model!r}{hint}")
    try:
        model = timm.create_model(args.model, **_model_kwargs(args))
    except (TypeError, ValueError) as error:
        return _fail(f"cannot build {args.model}: {' '.join(str(error).split())}")
    img_size = args.img_size or model.pretrained_cfg["input_size"][-1]
    in_chans = model.pretrained_cfg["input_size"][0]
    try:
        macs = count_macs(model, img_size, in_chans)
    except (RuntimeError, ValueError) as error:
        return _fail(f"cannot profile {args.model} at {img_size}px: {' '.join(str(error).split())[:300]}")
    graph = "-"
    if hasattr(model, "start_thresh"):
        graph = "knn" if model.start_thresh is None else f"threshold {model.start_thresh:g} - i*{model.dec:g}"
    rows = [
        ("model", "graph", "img", "classes", "params (M)", "MACs (G)"),
        (args.model, graph, str(img_size), str(getattr(model, "num_classes", "-")),
         f"{count_parameters(model) / 1e6:.2f}", f"{macs / 1e9:.2f}"),
    ]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
