"""Panther's neural-network modules."""
from .attention import RandMultiHeadAttention, make_performer
from .linear import SKLinear

__all__ = ["SKLinear", "RandMultiHeadAttention", "make_performer"]
