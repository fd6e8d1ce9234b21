"""The one way the trainer and the tools build a model: `create_model` from `vig.model_settings.ModelSettings`."""
from __future__ import annotations

import logging
from typing import Any

import timm
from torch import nn

from vig.model_settings import ModelSettings

__all__ = ["create_model"]

_LOGGER = logging.getLogger(__name__)


def create_model(settings: ModelSettings, num_classes: int | None = None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(settings.model, ...)`` with the settings that are set.

    The keyword arguments are ``timm_kwargs`` (passed on as they are: ``drop_rate``, ``pretrained``, ...),
    the class count (``num_classes``, else ``settings.num_classes``), the SViG thresholds
    (``start_thresh``, ``dec``) and ``settings.model_kwargs``, which win over all of them; then ``img_size``
    unless the kwargs hold one. A model whose constructor takes no ``img_size`` (one that takes any input
    size) is built at its default size, and that is logged.

    Raises:
        TypeError, ValueError: what the model's constructor raises for arguments it rejects.
    """
    name = settings.model
    if name is None:
        raise ValueError("no model name given")
    kwargs = dict(timm_kwargs)
    classes = num_classes if num_classes is not None else settings.num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    for threshold in ("start_thresh", "dec"):
        if getattr(settings, threshold) is not None:
            kwargs[threshold] = getattr(settings, threshold)
    kwargs.update(settings.model_kwargs)
    if settings.img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=settings.img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            _LOGGER.info("%s takes no img_size argument; building it at its default size", name)
    return timm.create_model(name, **kwargs)
