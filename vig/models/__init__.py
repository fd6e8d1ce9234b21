"""Vision GNN models; importing this package registers them with timm."""
from .batch_graph import BatchGraphNet
from .cifar_gat import CnnGatCifar, predict_flip_tta
from .convmixer_cifar import ConvMixerCifar
from .greedyvig import GreedyViG
from .isotropic import SIZES, VisionGNN
from .mobilevig import MobileViG
from .pyramid import PyramidVisionGNN

__all__ = ["SIZES", "BatchGraphNet", "CnnGatCifar", "ConvMixerCifar", "GreedyViG", "MobileViG", "PyramidVisionGNN", "VisionGNN",
           "predict_flip_tta"]
