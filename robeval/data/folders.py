"""Image folders: one sub-folder per class (sorted names give class indices 0, 1, ...), PNG or JPEG
images read with Pillow. A folder holding ``train/`` and ``test/`` sub-folders is read per split.

All images must have one size (resize them first); they become one channel when every image is
greyscale and three (RGB) otherwise. Any file that is not a .png/.jpg/.jpeg image is an error that
names it: nothing is skipped silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataNotFoundError, DataRangeError, RobevalError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_folder(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """(images (N, H, W, C) uint8, labels (N,), class names, a name for reports)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataNotFoundError("reading an image folder needs Pillow: pip install pillow") from None
    base = root / split if (root / split).is_dir() else root
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("train", "test")))
    if not classes:
        raise DataNotFoundError(f"{base} has no class sub-folders; expected one folder per class, e.g. "
                                f"{base}/cat/1.png and {base}/dog/2.png")
    files, labels = [], []
    for index, cls in enumerate(classes):
        entries = sorted((base / cls).iterdir())
        other = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
        if other:
            raise DataRangeError(f"{base / cls} holds files that are not PNG/JPEG images: {other[:5]}; move them out")
        files += entries
        labels += [index] * len(entries)
    if not files:
        raise DataNotFoundError(f"the class folders under {base} hold no images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append((im.mode, np.asarray(im.convert("RGB" if im.mode not in ("L", "1") else "L"))))
        except OSError as exc:
            raise RobevalError(f"{f} is not a readable image ({exc})") from None
    sizes = {a.shape[:2] for _, a in images}
    if len(sizes) > 1:
        first = next(f for f, (_, a) in zip(files, images) if a.shape[:2] != images[0][1].shape[:2])
        raise DataRangeError(f"images under {base} have different sizes {sorted(sizes)[:4]} (e.g. {first}); "
                             "resize them all to the model's input size first")
    grey = all(a.ndim == 2 for _, a in images)
    stack = [a[..., None] if grey else (np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a) for _, a in images]
    name = f"{root.name}" + (f":{split}" if base is not root else "")
    return np.stack(stack).astype(np.uint8), np.asarray(labels, dtype=np.int64), classes, name
