"""Export a model with ``torch.export`` and to ONNX, and check ONNX Runtime against PyTorch:
``vig-export MODEL OUT.onnx [--img-size S] [--batch-size B] [--checkpoint PATH [--model-ema]] [--with-graphs]``.

The model is exported in eval mode at a fixed input shape (B, C, S, S): ``torch.export`` makes the program,
``torch.onnx.export(..., dynamo=True)`` converts it. The check runs the ONNX file on ONNX Runtime's CPU
provider and compares it with the PyTorch model on one seeded random input: the largest absolute logit
difference relative to the largest PyTorch logit, for ONNX Runtime against PyTorch float32 and, as the
scale of float32 rounding itself, for PyTorch float64 against float32. With ``--with-graphs`` the file
also outputs the graph of every `gcn_lib.DynConv2d` block (ViG, SViG, pyramid ViG; see `WithGraphs`), and
ONNX Runtime's graphs are compared with PyTorch's: the same neighbour sets (kNN) or the same mask
(threshold). It prints one JSON line (see `Parity`).
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from gcn_lib import DynConv2d
from vig.checkpoint import ModelSettings, load_checkpoint
from vig.console import OneLineErrorParser, fail, require_model
from vig.errors import UsageError
from vig.models.factory import create_model
from vig.trainer.cli import _parse_model_kwargs

PROG = "vig-export"


class WithGraphs(nn.Module):
    """A model that also returns its graphs: images (B, C, H, W) -> (logits, graph_0, ..., graph_{n-1}).

    graph_i is what the i-th `gcn_lib.DynConv2d` of the model (in module order) hands to its graph
    convolution: neighbour indices (B, N, k) int64 for kNN, a mask (B, N, M) bool for the threshold graph.
    A model without such blocks returns (logits,), and so does a block that takes the fused GPU threshold
    kernel (CUDA tensors), which builds no graph tensor: use it on the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graphs: list[torch.Tensor] = []
        handles = [module.gconv.register_forward_pre_hook(lambda _, args: graphs.append(args[1]))
                   for module in self.model.modules() if isinstance(module, DynConv2d)]
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return (logits, *graphs)


def export_onnx(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor, path: str | Path,
                optimize: bool = True) -> None:
    """Write ``model`` (put in eval mode) traced on ``example`` (B, C, H, W), or a program ``torch.export``
    made of it, to the ONNX file ``path`` (``torch.onnx.export`` with ``dynamo=True``; ``optimize``: run the
    ONNX optimizer, constant folding and the like, on the result)."""
    if isinstance(model, nn.Module):
        model.eval()
    torch.onnx.export(model, (example,), str(path), dynamo=True, optimize=optimize, verbose=False)


def run_onnx(path: str | Path, example: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the ONNX file ``path`` on ``example``, run by ONNX Runtime's CPU provider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    return [torch.from_numpy(output) for output in outputs]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def same_graph(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two graphs are the same: equal masks, or neighbour indices (B, N, k) with the same set per node
    (the order among equally near neighbours is not part of the graph)."""
    if expected.dtype == torch.bool:
        return actual.dtype == torch.bool and torch.equal(actual, expected)
    return actual.shape == expected.shape and torch.equal(actual.sort(dim=-1).values, expected.sort(dim=-1).values)


@dataclass
class Parity:
    """ONNX Runtime against PyTorch on one input (see the module docstring)."""

    program_equal: bool  # the torch.export program gives PyTorch's outputs exactly
    ort_vs_fp32: float  # relative logit error of ONNX Runtime against PyTorch float32
    fp64_vs_fp32: float  # relative logit error of PyTorch float64 against float32
    graphs: int  # number of dynamic graphs compared (0 for a model without DynConv2d blocks)
    graphs_equal: bool  # every graph of ONNX Runtime equals PyTorch float32's
    graphs_leading_equal: int  # how many graphs, from the first block on, are equal before the first that is not


def check_parity(model: nn.Module, example: torch.Tensor, path: str | Path, graphs: bool = False,
                 optimize: bool = True) -> Parity:
    """Export ``model`` (eval mode; its `WithGraphs` with ``graphs``) on ``example`` with ``torch.export``,
    convert that program to the ONNX file ``path`` (``optimize`` as in `export_onnx`), and compare the program's and ONNX Runtime's outputs with
    PyTorch's; the float64 logits come from a float64 copy of the model."""
    model.eval()
    traced_model = WithGraphs(model) if graphs else model
    with torch.no_grad():
        expected = _as_tuple(traced_model(example))
        fp64 = copy.deepcopy(model).double()(example.double())
    program = torch.export.export(traced_model, (example,))
    with torch.no_grad():
        traced = _as_tuple(program.module()(example))
    export_onnx(program, example, path, optimize)
    actual = run_onnx(path, example)
    pairs = list(zip(actual[1:], expected[1:]))
    leading = next((i for i, (a, e) in enumerate(pairs) if not same_graph(a, e)), len(pairs))
    return Parity(program_equal=len(traced) == len(expected) and all(map(torch.equal, traced, expected)),
                  ort_vs_fp32=relative_error(actual[0], expected[0]),
                  fp64_vs_fp32=relative_error(fp64, expected[0]),
                  graphs=len(pairs), graphs_equal=leading == len(pairs), graphs_leading_equal=leading)


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="timm model name, e.g. vig_ti_cifar or mobilevig_ti")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--img-size", type=int, default=None, help="square image size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input (default 1)")
    parser.add_argument("--checkpoint", default=None, help="weights to load (default: random initial weights)")
    parser.add_argument("--model-ema", action="store_true", help="load the checkpoint's EMA weights")
    parser.add_argument("--model-kwargs", nargs="*", default=[],
                        help="timm.create_model keyword arguments, e.g. num_classes=10 depth=2")
    parser.add_argument("--with-graphs", action="store_true",
                        help="the file also outputs every DynConv2d block's graph; ONNX Runtime's are compared")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the check's input")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        args.model_kwargs = _parse_model_kwargs(args.model_kwargs)
        require_model(args.model)
        if args.batch_size < 1 or (args.img_size is not None and args.img_size < 1):
            raise UsageError("--batch-size and --img-size must be positive")
    except UsageError as error:
        return fail(PROG, error)
    torch.manual_seed(args.seed)
    try:
        model = create_model(ModelSettings(model=args.model, img_size=args.img_size, model_kwargs=args.model_kwargs))
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint, use_ema=args.model_ema)
    except (TypeError, ValueError) as error:
        return fail(PROG, f"cannot build {args.model}: {error}")
    in_chans, height, width = model.pretrained_cfg["input_size"]
    size = (args.img_size, args.img_size) if args.img_size else (height, width)
    example = torch.randn(args.batch_size, in_chans, *size)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    parity = check_parity(model, example, output, graphs=args.with_graphs)
    print(json.dumps({"model": args.model, "input": list(example.shape), "onnx": str(output), **asdict(parity)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
