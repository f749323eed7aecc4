"""Importing this package registers every op."""

from . import activations, arith, conv, dense, groupsort, pool, scale, shape  # noqa: F401
