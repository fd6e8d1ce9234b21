"""Vision GNN models; importing this package registers them with timm."""
from .isotropic import SIZES, VisionGNN

__all__ = ["SIZES", "VisionGNN"]
