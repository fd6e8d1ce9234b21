"""ViG / SViG toolkit: models registered with timm and the training pieces around them."""
from . import models
