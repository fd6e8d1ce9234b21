"""Published weights through timm's front door: pretrained tags, their sources, and the one-line offline error.

Each model file lists its published weights as timm pretrained tags (``name.tag`` in its ``default_cfgs``) built
with `weights_cfg`: a `VigPretrainedCfg`, timm's `PretrainedCfg` plus what timm's has no field for, the SViG
graph thresholds (``start_thresh``, ``dec``) the weights were trained with and which entry of a checkpoint dict
holds the weights the published accuracy was measured with (``use_ema``). The addresses below are the authors'
own (GitHub releases, the SViG repository's Git LFS files, Hugging Face repositories); the file formats differ
(bare state dict, ``model``, ``state_dict`` / ``state_dict_ema``) and `vig.checkpoint.checkpoint_filter_fn`
takes each.

`build_with_weights` is timm's `build_model_with_cfg` with that filter, the SViG checkpoints' plain-data pickle
globals allowed while a download is unpickled, and a download that fails (no network, not in the cache) turned
into one line naming the address and how to pass a local copy (``pretrained_cfg_overlay=dict(file=PATH)``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from timm.models import PretrainedCfg, build_model_with_cfg, get_pretrained_cfg, resolve_pretrained_cfg
from torch import nn

from vig.checkpoint import SAFE_GLOBALS, checkpoint_filter_fn, read_checkpoint, whole_reason
from vig.errors import WeightsUnavailableError

_logger = logging.getLogger(__name__)

VIG_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/vig/"
PVIG_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/pyramid-vig/"
# Git LFS files of the SViG repository's folder "SViG Model Checkpoints/" (branch main)
SVIG_FOLDER = "https://media.githubusercontent.com/media/IsmaelElsharkawi/SViG/main/SViG%20Model%20Checkpoints/"
MOBILEVIG_HUB = "SLDGroup/MobileViG"
GREEDYVIG_HUB = "SLDGroup/GreedyViG"

VIG_PAPER = dict(paper_ids="arXiv:2206.00272", paper_name="Vision GNN: An Image is Worth Graph of Nodes",
                 license="apache-2.0", origin_url="https://github.com/huawei-noah/Efficient-AI-Backbones")
SVIG_PAPER = dict(paper_ids="doi:10.1109/ACCESS.2025.3531691",
                  paper_name="SViG: A Similarity-Thresholded Approach for Vision Graph Neural Networks",
                  license="gpl-3.0", origin_url="https://github.com/IsmaelElsharkawi/SViG")
MOBILEVIG_PAPER = dict(paper_ids="arXiv:2307.00395",
                       paper_name="MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications",
                       origin_url="https://github.com/SLDGroup/MobileViG")
GREEDYVIG_PAPER = dict(paper_ids="arXiv:2405.06849",
                       paper_name="GreedyViG: Dynamic Axial Graph Construction for Efficient Vision GNNs",
                       license="apache-2.0", origin_url="https://github.com/SLDGroup/GreedyViG")


@dataclasses.dataclass
class VigPretrainedCfg(PretrainedCfg):
    """timm's pretrained config plus the settings of published ViG-family weights that timm has no field for.

    Attributes:
        start_thresh, dec: the SViG similarity-threshold schedule the weights were trained with; the model of the
            tag is built with it unless the caller gives its own (None: not a threshold-graph checkpoint).
        use_ema: take a checkpoint dict's ``state_dict_ema`` (the authors evaluate these weights with
            ``--model-ema``) instead of its ``state_dict``.
        top1: ImageNet-1k top-1 (%) as the authors publish it for these weights (None: none published).
    """

    start_thresh: float | None = None
    dec: float | None = None
    use_ema: bool = False
    top1: float | None = None


def weights_cfg(base: dict[str, Any], **settings: Any) -> VigPretrainedCfg:
    """A pretrained tag's config: the model's default cfg ``base`` with ``settings`` (source, paper, license,
    thresholds, published top-1) replacing or adding entries."""
    return VigPretrainedCfg(**{**base, **settings})


def tag_settings(variant: str, pretrained_cfg: Any) -> dict[str, float]:
    """The SViG thresholds that the pretrained tag ``pretrained_cfg`` (as timm hands it to a model's entry point:
    a tag string, a config or None for the default tag) of ``variant`` carries: {'start_thresh': t, 'dec': d}
    or {}."""
    if isinstance(pretrained_cfg, str):
        config = get_pretrained_cfg(f"{variant}.{pretrained_cfg}")
    elif isinstance(pretrained_cfg, PretrainedCfg):
        config = pretrained_cfg
    elif pretrained_cfg is None:
        config = get_pretrained_cfg(variant)
    else:
        config = None
    if not isinstance(config, VigPretrainedCfg) or config.start_thresh is None:
        return {}
    return {"start_thresh": config.start_thresh, "dec": config.dec if config.dec is not None else 0.0}


def _source(pretrained_cfg: dict[str, Any]) -> str:
    """Where timm fetches the weights of ``pretrained_cfg`` from, for the error message."""
    if pretrained_cfg.get("hf_hub_id"):
        name = pretrained_cfg.get("hf_hub_filename")
        return f"https://huggingface.co/{pretrained_cfg['hf_hub_id']}" + (f"/blob/main/{name}" if name else "")
    return str(pretrained_cfg.get("url") or "")


def _read_local_copy(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> str | None:
    """For ``pretrained_cfg_overlay=dict(file=PATH)`` on a published tag: read PATH with this project's safe reader
    and hand timm the whole checkpoint dict (``state_dict`` overlay) in its place, so that `checkpoint_filter_fn`
    picks the entry the tag names (timm's own file reader prefers any EMA entry). Returns PATH, or None when the
    call is not such a one (it then loads as timm loads it)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    path = overlay.get("file")
    if not (pretrained and path) or overlay.get("state_dict") is not None:
        return None
    if not isinstance(resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg")), VigPretrainedCfg):
        return None
    overlay["state_dict"] = read_checkpoint(path)
    kwargs["pretrained_cfg_overlay"] = overlay
    return str(path)


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool,
                       **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg(model_cls, variant, pretrained, **kwargs)`` with `checkpoint_filter_fn` as the
    weights filter.

    Raises:
        WeightsUnavailableError: the download of the published weights failed (no network, not in the torch hub /
            Hugging Face cache, refused); one line naming the address and ``pretrained_cfg_overlay=dict(file=PATH)``.
    """
    kwargs.setdefault("pretrained_filter_fn", checkpoint_filter_fn)
    local_copy = _read_local_copy(variant, pretrained, kwargs)
    try:
        # The SViG checkpoints hold their training flags (argparse.Namespace) and numpy metrics: plain data,
        # which torch's weights-only unpickler (timm's URL download) rebuilds only when allowed.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
        if local_copy:  # keep the file's name, not its tensors, in the model's config
            model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "state_dict": None, "file": local_copy}
        return model
    except OSError as err:  # urllib's URLError / HTTPError, huggingface_hub's offline and not-found errors
        if not pretrained:
            raise
        config = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"),
                                        kwargs.get("pretrained_cfg_overlay")).to_dict()
        if config.get("file") or local_copy:
            raise  # a local file the caller named: its own error (not a download)
        reason = whole_reason(err) if str(err).strip() else type(err).__name__  # whole sentences, never cut
        raise WeightsUnavailableError(
            f"{variant}: cannot download the pretrained weights from {_source(config)} ({reason}); without a "
            "network pass a local copy of that file: pretrained_cfg_overlay=dict(file=PATH)",
            argument="pretrained_cfg_overlay") from None
