"""Encoders and projector heads (flax.linen); they import flax and nothing else of embedspace."""

from embedspace.models.heads import MLP, EmbeddingModel
from embedspace.models.resnet import BasicBlock, ResNet, ResNet18, small

__all__ = ["MLP", "BasicBlock", "EmbeddingModel", "ResNet", "ResNet18", "small"]
