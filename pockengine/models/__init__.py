"""Real pretrained models that load offline from pip packages."""

from .mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, mobilenet_v2
from .text import minilm_classifier, smollm2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MobileNetV2", "mobilenet_v2", "minilm_classifier", "smollm2"]
