"""One image in, one stored sample out: centre crop, antialiased resize, encode.

The original DDPM trained LSUN and CelebA-HQ 256x256 from the ProGAN TFRecords
(`run_lsun.py --tfr_file .../church-r08.tfrecords`, r08 = 2^8 = 256). ProGAN's
`dataset_tool.py create_lsun` crops the centre square of side min(H, W) with
`img[(H - c) // 2:(H + c) // 2, (W - c) // 2:(W + c) // 2]` and resizes with
`PIL.Image.ANTIALIAS`, which is Pillow's LANCZOS filter (antialiased: the kernel widens
with the reduction factor). We do exactly that, with `reducing_gap=None` (Pillow's default,
an exact resample with no draft/box pre-reduction), so the result matches the original's
pixels for the same decoded input.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = ("npy", "png", "jpg")
# Lossless and the fastest to load: at 256x256 the loader reads npy at ~3.5x the speed of PNG on
# one core (PNG decode is the bottleneck), for ~1.8x the disk. bench/RESULTS.md "## Data" has the numbers.
DEFAULT_FORMAT = "npy"
# zlib level of stored PNGs; see bench/RESULTS.md "## Data" for the size / decode-speed trade-off.
PNG_LEVEL = 1


class TooSmall(ValueError):
    """The image is smaller than the target resolution and upscaling was not allowed."""


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """PIL box (left, upper, right, lower) of the centre square, rounded as ProGAN does."""
    c = min(width, height)
    left, top = (width - c) // 2, (height - c) // 2
    return left, top, left + c, top + c


def center_crop_resize(img: Image.Image, resolution: int, allow_upscale: bool = False) -> Image.Image:
    """RGB centre square of side min(W, H), resized to `resolution` with LANCZOS (ProGAN/DDPM)."""
    img = img.convert("RGB")
    if min(img.size) < resolution and not allow_upscale:
        raise TooSmall(f"too small: {img.width}x{img.height} < {resolution}")
    img = img.crop(center_crop_box(*img.size))
    if img.width != resolution:
        img = img.resize((resolution, resolution), Image.LANCZOS, reducing_gap=None)
    return img


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded bytes fully (a truncated file raises here, not later)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def encode(img: Image.Image | np.ndarray, fmt: str = DEFAULT_FORMAT, quality: int = 95, png_level: int = PNG_LEVEL) -> bytes:
    """Bytes of one stored sample: npy (uint8 HWC, lossless, default), PNG (lossless; zlib
    `png_level`) or JPEG (`quality`)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), allow_pickle=False)
        return buf.getvalue()
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png_level)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return buf.getvalue()


def process_bytes(data: bytes, resolution: int, fmt: str, quality: int, allow_upscale: bool,
                  png_level: int = PNG_LEVEL) -> bytes:
    """Encoded source bytes -> encoded sample bytes (raises on undecodable / too small input)."""
    return encode(center_crop_resize(decode_image(data), resolution, allow_upscale), fmt, quality, png_level)
