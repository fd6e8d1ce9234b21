"""Parameters and MACs of a model: ``vig-macs MODEL [--start-thresh T --dec D] [--img-size S] [--num-classes N]
[--pretrained]``.

MACs (multiply-accumulates of one image; the published papers call them FLOPs) are counted by
torchprofile on a traced forward pass in eval mode (`vig.complexity`). Any timm model name works;
the ViG / SViG names are registered by ``import vig``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vig.checkpoint import ModelSettings
from vig.complexity import count_macs, count_parameters
from vig.console import OneLineErrorParser, fail, format_table, require_model
from vig.errors import RunError, UsageError
from vig.graph_info import describe_graph
from vig.models.factory import create_model

PROG = "vig-macs"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="timm model name, e.g. vig_ti_224_gelu or svig_ti_224_gelu")
    parser.add_argument("--start-thresh", type=float, default=None,
                        help="similarity threshold of the first block (switches to the threshold graph)")
    parser.add_argument("--dec", type=float, default=None, help="threshold decrement per block")
    parser.add_argument("--img-size", type=int, default=None, help="square image size (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    parser.add_argument("--pretrained", action="store_true",
                        help="build the model with its published weights (MODEL.TAG picks a tag; a download or "
                             "the torch hub / Hugging Face cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        require_model(args.model)
    except UsageError as error:
        return fail(PROG, error)
    try:
        model = create_model(ModelSettings(model=args.model, img_size=args.img_size, num_classes=args.num_classes,
                                           start_thresh=args.start_thresh, dec=args.dec),
                             **({"pretrained": True} if args.pretrained else {}))
    except (TypeError, ValueError, RunError) as error:
        return fail(PROG, f"cannot build {args.model}: {error}")
    img_size = args.img_size or model.pretrained_cfg["input_size"][-1]
    in_chans = model.pretrained_cfg["input_size"][0]
    try:
        macs = count_macs(model, img_size, in_chans)
    except (RuntimeError, ValueError) as error:
        return fail(PROG, f"cannot profile {args.model} at {img_size}px: {str(error)[:300]}")
    rows = [
        ("model", "graph", "img", "classes", "params (M)", "MACs (G)"),
        (args.model, describe_graph(model).label, img_size, getattr(model, "num_classes", "-"),
         f"{count_parameters(model) / 1e6:.2f}", f"{macs / 1e9:.3f}"),
    ]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
