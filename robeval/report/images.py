"""Adversarial examples as exact PNG images: grey or colour, channels first or last, scaled from the
input domain to 0..255, each pixel enlarged to a square block so that 28x28 or 32x32 inputs are
visible. PNG is written here (zlib + CRC, colour types 0 and 2), so the images need neither
matplotlib nor Pillow, and what the page shows is exactly the model's input.

>>> rgb = to_pixels(numpy.zeros((3, 2, 2)), (0.0, 1.0))
>>> rgb.shape, rgb.dtype
((2, 2, 3), dtype('uint8'))
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from typing import Any

import numpy

#: Enlarge every image until its longer side has at least this many PNG pixels.
MIN_SIDE = 96
LAYOUTS = ("CHW", "HWC")


def image_layout(shape: tuple[int, ...]) -> str:
    """"CHW" or "HWC" for a 3-D per-sample shape: channels last when only the last axis holds 1 or 3
    entries, else channels first (robeval's layout, also for ambiguous shapes such as (3, 8, 3))."""
    if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
        return "HWC"
    return "CHW"


def as_image(a: Any, layout: str | None = None) -> numpy.ndarray:
    """(H, W) grey or (H, W, 3) colour float64 array from one sample of shape (C, H, W), (H, W, C),
    (H, W) or flattened (H*W or 3*H*W, square images only; colour flattened channel by channel)."""
    a = numpy.asarray(a, dtype=numpy.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        colour = math.isqrt(a.size // 3) if a.size % 3 == 0 else 0
        if side * side == a.size:
            return a.reshape(side, side)
        if colour and 3 * colour * colour == a.size:
            a = a.reshape(3, colour, colour)
        else:
            return a[None, :]
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"an image sample has shape {a.shape}; expected (C, H, W), (H, W, C), (H, W) or flat")
    layout = layout or image_layout(a.shape)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    hwc = a if layout == "HWC" else a.transpose(1, 2, 0)
    if hwc.shape[-1] == 3:
        return hwc
    return hwc[..., 0]  # grey, or the first channel of an input that is not RGB


def display_range(domain: Any, *arrays: numpy.ndarray) -> tuple[float, float]:
    """(lo, hi) that maps to 0..255: the input domain when finite, else the arrays' joint range."""
    try:
        lo, hi = (float(d) for d in domain)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        return lo, hi
    lo = min(float(numpy.min(a)) for a in arrays)
    hi = max(float(numpy.max(a)) for a in arrays)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def to_pixels(a: Any, value_range: tuple[float, float], layout: str | None = None) -> numpy.ndarray:
    """uint8 (H, W) or (H, W, 3): ``round(255 * (a - lo) / (hi - lo))``, clipped to 0..255."""
    img = as_image(a, layout)
    lo, hi = value_range
    return numpy.clip(numpy.rint(255.0 * (img - lo) / (hi - lo)), 0, 255).astype(numpy.uint8)


def perturbation_pixels(x: Any, x_adv: Any, layout: str | None = None) -> tuple[numpy.ndarray, float]:
    """The perturbation x_adv - x shown around mid grey (128 = no change), scaled so that the largest
    change reaches 0 or 255; returns (uint8 image, the factor that maps the change to 0..0.5)."""
    delta = as_image(x_adv, layout) - as_image(x, layout)
    peak = float(numpy.max(numpy.abs(delta), initial=0.0))
    gain = 0.5 / peak if peak > 0 else 0.0
    return to_pixels(0.5 + gain * delta, (0.0, 1.0), layout="HWC" if delta.ndim == 3 else None), gain


def enlarge(pixels: numpy.ndarray, min_side: int = MIN_SIDE) -> tuple[numpy.ndarray, int]:
    """Each pixel repeated into a k x k block, k the smallest integer making the longer side >= min_side."""
    k = max(1, math.ceil(min_side / max(pixels.shape[:2])))
    return pixels.repeat(k, axis=0).repeat(k, axis=1), k


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: numpy.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grey or (H, W, 3) RGB image (8 bits per channel, no filter)."""
    pixels = numpy.ascontiguousarray(pixels)
    if pixels.dtype != numpy.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"pixels are {pixels.dtype}{pixels.shape}; expected uint8 (H, W) or (H, W, 3)")
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(h, -1)
    raw = numpy.concatenate([numpy.zeros((h, 1), numpy.uint8), rows], axis=1).tobytes()  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def example_images(example: Any, domain: Any) -> dict[str, Any]:
    """PNG bytes of one Example's original, adversarial input and perturbation, with the facts to
    caption them: {"original", "adversarial", "perturbation": bytes, "colour": bool, "magnification":
    the perturbation's contrast over the images', "block": pixel block size, "linf", "l2": the
    perturbation's norms, "range": the (lo, hi) shown as 0..255}."""
    x, x_adv = numpy.asarray(example.x, numpy.float64), numpy.asarray(example.x_adv, numpy.float64)
    rng = display_range(domain, x, x_adv)
    original, block = enlarge(to_pixels(x, rng))
    adversarial, _ = enlarge(to_pixels(x_adv, rng))
    delta, gain = perturbation_pixels(x, x_adv)
    delta, _ = enlarge(delta)
    d = (x_adv - x).ravel()
    return {"original": encode_png(original), "adversarial": encode_png(adversarial),
            "perturbation": encode_png(delta), "colour": original.ndim == 3,
            "magnification": gain * (rng[1] - rng[0]), "block": block,
            "linf": float(numpy.abs(d).max(initial=0.0)), "l2": float(numpy.sqrt(d @ d)), "range": rng}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")




#: Folder, next to report.md, that ``Report.save`` writes the example images into.
EXAMPLES_DIR = "examples"
KINDS = ("original", "adversarial", "perturbation")


def example_file(position: int, example: Any, kind: str) -> str:
    """The relative path of one example image, e.g. ``examples/1-sample42-adversarial.png``."""
    return f"{EXAMPLES_DIR}/{position}-sample{example.index}-{kind}.png"


__all__ = ["image_layout", "as_image", "display_range", "to_pixels", "perturbation_pixels", "enlarge",
           "encode_png", "example_images", "example_file", "b64", "EXAMPLES_DIR", "KINDS"]
