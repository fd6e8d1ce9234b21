"""Refuse an image size at which the model's first graph has fewer nodes than its k.

A ViG model built for a small ``--img-size`` caps its kNN schedule (`vig.models.isotropic.knn_schedule`):
at 7 px, vig_ti_224_gelu has a single node, its "graph" links the node to itself, and the run trains at
chance. `require_graph_size` measures the node count N (H x W of the map that reaches the first
`gcn_lib.DynConv2d`) with a forward pass of a single image that stops there, and refuses a size where
N < k, naming the smallest size that works. k is that layer's k in the model built at its default size
(a small size caps the layer's own k at N); for a threshold graph, whose neighbour count is not fixed,
k = 2. Models without a `DynConv2d`, and sizes from the model's default up, are not checked.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from gcn_lib import DynConv2d
from vig.errors import UsageError



def first_graph(model: nn.Module, img_size: int, in_chans: int = 3) -> tuple[int, int, str] | None:
    """(N, k, name) of the first DynConv2d a (1, in_chans, img_size, img_size) image reaches: its node count,
    the fewest nodes it needs (its kNN k; 2 for a threshold graph) and its module name; None without one.
    Errors of the forward pass (a size the model refuses) propagate."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, DynConv2d)}
    if not names:
        return None
    found: list[tuple[int, int, str]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not found:
            height, width = inputs[0].shape[-2:]
            needed = 2 if module.graph == "threshold" else int(module.k)
            found.append((int(height * width), needed, names[module]))
        raise _Seen()

    hooks = [module.register_forward_pre_hook(record) for module in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
            model(torch.zeros(1, in_chans, img_size, img_size, device=device, dtype=dtype))
    except _Seen:
        pass
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found[0] if found else None


class _Seen(Exception):
    """Stops the probe's forward pass at the first graph layer."""


def require_graph_size(model: nn.Module | None, img_size: int, build: Callable[[int], nn.Module],
                       default_size: int, in_chans: int = 3) -> None:
    """UsageError when ``model`` (built for ``img_size``; None: the model refused that size) has fewer nodes in its
    first graph than that graph's k, naming the smallest size that works (between ``img_size`` and the default).

    Args:
        model: the built model, or None when building it for ``img_size`` raised a ValueError.
        img_size: its input size.
        build: builds the same model for another size (to find the smallest size that works).
        default_size: the model's default input size, at which its k is not capped.
    """
    if img_size >= default_size:
        return
    reference = first_graph(build(default_size), default_size, in_chans)
    if reference is None:
        return
    needed = reference[1]
    graph = first_graph(model, img_size, in_chans) if model is not None else None
    if model is not None and (graph is None or graph[0] >= needed):
        return

    def works(size: int) -> bool:
        logging.disable(logging.WARNING)  # the probes' kNN-cap warnings are not this run's
        try:
            found = first_graph(build(size), size, in_chans)
        except ValueError:  # UsageError is one
            return False
        finally:
            logging.disable(logging.NOTSET)
        return found is None or found[0] >= needed

    low, high = img_size, default_size  # the default size works

    while high - low > 1:  # the node count grows with the size: bisect (low fails, high works)
        middle = (low + high) // 2
        low, high = (low, middle) if works(middle) else (middle, high)
    if graph is not None:
        nodes, _, name = graph
        what = f"its k is {needed}" if needed > 2 else "a graph needs 2"
        found = f"the first graph layer ({name}) has {nodes} node(s) and {what}"
    else:
        found = "the model's graph would have a single node"
    raise UsageError(f"--img-size {img_size} is too small: {found}, so the model would train on a degenerate "
                     f"graph; the smallest size that works is {high} px (--allow-small-graph trains anyway where "
                     "the graph has 2 nodes or more)")


def section_builder(build_model: Callable[..., nn.Module], model_section: object,
                    num_classes: int) -> Callable[[int], nn.Module]:
    """``build(size)`` for `require_graph_size`: ``build_model`` of the model section with another img_size (and
    no pretrained weights, which only the real model loads)."""
    return lambda size: build_model(dataclasses.replace(model_section, img_size=size, pretrained=False,
                                                        pretrained_path=None), num_classes)
