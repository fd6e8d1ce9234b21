"""ViG / SViG toolkit: ``import vig`` registers the models with timm (``timm.create_model("vig_ti_224_gelu")``)."""
from . import models
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "models", "read_checkpoint"]
