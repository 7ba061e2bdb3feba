"""Panther's neural-network modules."""
from .attention import FavorDecodeState, RandMultiHeadAttention, make_performer
from .linear import SKLinear

__all__ = ["SKLinear", "RandMultiHeadAttention", "FavorDecodeState", "make_performer"]
