"""Throughput and memory benchmarks: whole-model train / inference steps, or the graph op alone.

    vig-benchmark --model vig_ti_224_gelu svig_ti_224_gelu --batch-size 128 --amp-dtype bfloat16
    vig-benchmark --model vig_ti_224_gelu --no-graph            # the dense floor
    vig-benchmark --mode graph --batch-size 128 --threshold 0.89  # aggregation alone

Images per second are the median over the timed iterations (after warm-up), each synchronised
with the device. A table goes to standard output and, with ``--json``, the rows to a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import timm
import torch

import gcn_lib
from gcn_lib import DynConv2d, interleave_channels
from vig.checkpoint import ModelSettings
from vig.console import OneLineErrorParser, fail, format_table, require_model
from vig.errors import UsageError
from vig.graph_info import describe_graph
from vig.models.factory import create_model
from vig.models.isotropic import SVIG_DEC

PROG = "vig-benchmark"

_LOGGER = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _zero_aggregation_forward(self: DynConv2d, x: torch.Tensor, relative_pos: torch.Tensor | None = None) -> torch.Tensor:
    """DynConv2d.forward with the graph aggregation replaced by zeros (the --no-graph control)."""
    b, c, h, w = x.shape
    nodes = x.reshape(b, c, -1, 1)
    return self.gconv.nn(interleave_channels(nodes, torch.zeros_like(nodes))).reshape(b, -1, h, w)


def remove_graph(model: torch.nn.Module) -> int:
    """Replace every DynConv2d's aggregation by zeros in place; returns how many were replaced."""
    count = 0
    for module in model.modules():
        if isinstance(module, DynConv2d):
            module.forward = types.MethodType(_zero_aggregation_forward, module)
            count += 1
    return count


def _autocast(device: torch.device, amp_dtype: str | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, amp_dtype))


def benchmark_model(args: argparse.Namespace, name: str, device: torch.device) -> list[dict]:
    """Train-step and inference rows for one model."""
    # models that take any input size are built as they are; --img-size then only sets the input
    sized = args.img_size and timm.models.get_pretrained_cfg(name).fixed_input_size
    threshold = args.start_thresh is not None
    settings = ModelSettings(model=name, img_size=args.img_size if sized else None, start_thresh=args.start_thresh,
                             dec=args.dec if threshold else None)
    model = create_model(settings).to(device)
    size = args.img_size or model.pretrained_cfg["input_size"][-1]
    if args.no_graph:
        _LOGGER.info("replaced the aggregation of %d graph convolutions by zeros", remove_graph(model))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    runner = torch.compile(model) if args.torchcompile else model
    rows = []
    base = {"model": name, "graph": "none" if args.no_graph else describe_graph(model).kind,
            "amp_dtype": args.amp_dtype or "float32", "channels_last": args.channels_last,
            "compile": args.torchcompile, "img_size": size, "device": str(device)}

    if args.train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=memory_format)
        labels = torch.randint(0, model.num_classes, (args.batch_size,), device=device)

        def train_step() -> None:
            with _autocast(device, args.amp_dtype):
                loss = torch.nn.functional.cross_entropy(runner(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        rows.append(_measure(base | {"step": "train", "batch": args.batch_size}, train_step, device, args))
        if args.profile:
            profile_step(train_step, device, args.profile)

    if args.infer:
        model.eval()
        images = torch.randn(args.infer_batch_size, 3, size, size, device=device).to(memory_format=memory_format)

        @torch.inference_mode()
        def infer_step() -> None:
            with _autocast(device, args.amp_dtype):
                runner(images)

        rows.append(_measure(base | {"step": "infer", "batch": args.infer_batch_size}, infer_step, device, args))
    return rows


def _measure(row: dict, step: Callable[[], None], device: torch.device, args: argparse.Namespace) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_iterations(step, device, args.warmup, args.iters)
    median = statistics.median(times)
    row = row | {"images_per_s": round(row["batch"] / median, 1), "ms_per_step": round(1000 * median, 2)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def profile_step(step: Callable[[], None], device: torch.device, path: Path, row_limit: int = 25) -> dict:
    """Profile one call of ``step`` (already warmed up) with torch.profiler and write JSON to ``path``.

    The JSON holds ``table`` (torch.profiler's table of the top ``row_limit`` entries by self time:
    device time on CUDA, CPU time otherwise) and ``top``: name, calls and self milliseconds of the
    top entries, GPU kernels only on CUDA, operators on CPU.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    entries = [entry for entry in averages
               if device.type != "cuda" or entry.device_type == torch.autograd.DeviceType.CUDA]
    entries.sort(key=lambda entry: getattr(entry, sort_by), reverse=True)
    result = {"sort_by": sort_by, "device": str(device),
              "top": [{"name": entry.key, "calls": entry.count, "self_ms": round(getattr(entry, sort_by) / 1000, 3)}
                      for entry in entries[:row_limit]],
              "table": averages.table(sort_by=sort_by, row_limit=row_limit)}
    path.write_text(json.dumps(result, indent=2))
    _LOGGER.info("profile of one step written to %s", path)
    return result


def benchmark_graph(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The threshold-graph max-relative aggregation alone, forward + backward, for each implementation."""
    b, c, n, t = args.batch_size, args.channels, args.nodes, args.threshold
    dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else torch.float32
    x = torch.randn(b, c, n, 1, device=device, dtype=dtype, requires_grad=True)

    def dense(features: torch.Tensor) -> torch.Tensor:
        return gcn_lib.max_relative_dense(features, gcn_lib.threshold_mask(features, t))

    def scatter(features: torch.Tensor) -> torch.Tensor:
        return gcn_lib.max_relative_scatter(features, gcn_lib.mask_to_edge_index(gcn_lib.threshold_mask(features, t)))

    implementations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": dense, "scatter": scatter}
    if args.torchcompile:
        implementations["dense, torch.compile"] = torch.compile(dense, fullgraph=True)
    if gcn_lib.kernels.runnable(x):
        implementations["kernel"] = lambda features: gcn_lib.kernels.threshold_max_relative(features, t)
    rows = []
    for name, fn in implementations.items():
        def step(fn=fn) -> None:
            fn(x).sum().backward()
        row = {"step": "graph-op fwd+bwd", "impl": name, "batch": b, "channels": c, "nodes": n, "t": t,
               "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
        rows.append(_measure(row, step, device, args))
    return rows


def rows_table(rows: list[dict]) -> str:
    """Rows of dicts -> a fixed-width text table over the union of their keys."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return format_table([columns, *([row.get(column, "") for column in columns] for row in rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("model", "graph"), default="model")
    parser.add_argument("--model", nargs="+", default=["vig_ti_224_gelu"])
    parser.add_argument("--start-thresh", type=float, default=None)
    parser.add_argument("--dec", type=float, default=SVIG_DEC,
                        help="SViG threshold decrement per block, with --start-thresh (default %(default)s)")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--infer-batch-size", type=int, default=256)
    parser.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--torchcompile", action="store_true",
                        help="torch.compile the model (graph mode: adds the compiled dense implementation)")
    parser.add_argument("--no-graph", action="store_true", help="replace the graph aggregation by zeros")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-infer", dest="infer", action="store_false")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--channels", type=int, default=192, help="graph mode: C")
    parser.add_argument("--nodes", type=int, default=196, help="graph mode: N")
    parser.add_argument("--threshold", type=float, default=0.89, help="graph mode: t")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="model mode: after timing, profile one training step with torch.profiler "
                             "and write its top entries as JSON here")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "infer_batch_size", "iters"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N, ...)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        if args.mode == "model":
            for name in args.model:
                require_model(name)
    except UsageError as error:
        return fail(PROG, error)
    device = torch.device(args.device)
    if args.mode == "graph":
        rows = benchmark_graph(args, device)
    else:
        rows = [row for name in args.model for row in benchmark_model(args, name, device)]
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(rows_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
