"""Models registered with timm on import."""
from . import cifar_gat
