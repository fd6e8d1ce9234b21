"""One description of the graph a built model uses, for logs, tables and result files.

The isotropic ViG / SViG models expose ``start_thresh`` / ``dec`` (None for the kNN graph); other
models (e.g. ``cnn_gat_cifar``) build their own graph and are described as such.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gcn_lib import DynConv2d


@dataclass(frozen=True)
class GraphInfo:
    """kind: 'knn', 'threshold' or 'own' (a model without the ViG graph switch); the SViG threshold
    schedule t_i = start_thresh - i * dec for 'threshold', else None."""

    kind: str
    start_thresh: float | None = None
    dec: float | None = None

    @property
    def label(self) -> str:
        """'kNN', 'threshold start 0.89 dec 0.03' or "model's own"."""
        if self.kind == "threshold":
            return f"threshold start {self.start_thresh:g} dec {self.dec:g}"
        return "kNN" if self.kind == "knn" else "model's own"


def describe_graph(model: nn.Module) -> GraphInfo:
    """The graph rule of a built model (see `GraphInfo`)."""
    if not hasattr(model, "start_thresh"):
        return GraphInfo("own")
    if model.start_thresh is None:
        return GraphInfo("knn")
    return GraphInfo("threshold", float(model.start_thresh), float(model.dec))


def describe_conv(conv: DynConv2d) -> str:
    """How one dynamic graph convolution builds its graph: 't = 0.86' or 'k = 9, dilation = 2'."""
    if conv.graph == "threshold":
        return f"t = {conv.threshold:.3g}"
    return f"k = {conv.k}, dilation = {conv.dilation}"
