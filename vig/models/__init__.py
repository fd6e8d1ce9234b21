"""Vision GNN models; importing this package registers them with timm."""
from .cifar_gat import CnnGatCifar, predict_flip_tta
from .isotropic import SIZES, VisionGNN

__all__ = ["SIZES", "CnnGatCifar", "VisionGNN", "predict_flip_tta"]
