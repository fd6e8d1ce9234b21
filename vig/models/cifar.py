"""CIFAR-10 input conventions shared by the CIFAR-line models' pretrained configs: image size and the
per-channel mean / std of the CIFAR-10 training images (RGB, on [0, 1] pixel values)."""
from __future__ import annotations

CIFAR_IMG_SIZE = 32
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
