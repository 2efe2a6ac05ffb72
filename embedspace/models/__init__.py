"""Encoders and projector heads (flax.linen); they import flax and nothing else of embedspace."""

from embedspace.models.dino_head import DINOHead
from embedspace.models.heads import MLP, EmbeddingModel
from embedspace.models.resnet import KERNEL_INITS, BasicBlock, ResNet, ResNet18, small
from embedspace.models.vit import ViT, ViTTiny

__all__ = ["KERNEL_INITS", "MLP", "BasicBlock", "DINOHead", "EmbeddingModel", "ResNet", "ResNet18",
           "ViT", "ViTTiny", "small"]
