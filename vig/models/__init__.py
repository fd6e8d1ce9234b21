"""Vision GNN models; importing this package registers them with timm."""
from .cifar_gat import CnnGatCifar, predict_flip_tta
from .isotropic import SIZES, VisionGNN
from .pyramid import PyramidVisionGNN

__all__ = ["SIZES", "CnnGatCifar", "PyramidVisionGNN", "VisionGNN", "predict_flip_tta"]
