"""The framework-neutral network representation and its op registry."""

from . import ops  # noqa: F401  (registers the ops)
from .graph import Network, Node
from .registry import OPS, get_op, register

__all__ = ["Network", "Node", "OPS", "get_op", "register"]
