"""Panther's neural-network modules."""
from .linear import SKLinear

__all__ = ["SKLinear"]
