"""Small shared helpers: progress bars that disappear when not wanted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress_bar(items: Iterable[Any], total: int | None = None, desc: str = "", enabled: bool = True):
    """Wrap ``items`` in a tqdm bar on stderr when enabled and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
