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
import warnings

import numpy as np
from PIL import Image

FORMATS = ("npy", "png", "jpg")
# Lossless and the fastest to load: at 256x256 the loader reads npy at ~3.5x the speed of PNG on
# one core (PNG decode is the bottleneck), for ~1.8x the disk. bench/RESULTS.md "## Data" has the numbers.
DEFAULT_FORMAT = "npy"
# zlib level of stored PNGs; see bench/RESULTS.md "## Data" for the size / decode-speed trade-off.
PNG_LEVEL = 1


# Decompression bombs: a few KB of PNG or GIF can declare 100 000 x 100 000 pixels (40 GB
# decoded). An input may hold at most max_pixels(resolution) pixels, checked from its header
# before anything is decoded: 256x the output's pixels, and never less than 4096 x 4096, which
# admits every real source (CelebA-HQ 1024^2, FFHQ, LSUN, photographs up to 16 Mpx).
MIN_PIXEL_LIMIT = 4096 * 4096
PIXEL_FACTOR = 256


def max_pixels(resolution: int) -> int:
    return max(MIN_PIXEL_LIMIT, PIXEL_FACTOR * resolution * resolution)


class TooSmall(ValueError):
    """The image is smaller than the target resolution and upscaling was not allowed."""


class Refused(ValueError):
    """An input skipped and listed on purpose: a decompression bomb, or pixels we cannot convert."""


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """PIL box (left, upper, right, lower) of the centre square, rounded as ProGAN does."""
    c = min(width, height)
    left, top = (width - c) // 2, (height - c) // 2
    return left, top, left + c, top + c


def center_crop_resize(img: Image.Image, resolution: int, allow_upscale: bool = False) -> Image.Image:
    """RGB centre square of side min(W, H), resized to `resolution` with LANCZOS (ProGAN/DDPM)."""
    img = to_rgb8(img)
    if min(img.size) < resolution and not allow_upscale:
        raise TooSmall(f"too small: {img.width}x{img.height} < {resolution}")
    img = img.crop(center_crop_box(*img.size))
    if img.width != resolution:
        img = img.resize((resolution, resolution), Image.LANCZOS, reducing_gap=None)
    return img


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit images (modes I;16*, and I, which Pillow uses for 16-bit PNGs) are scaled
    from 0..65535; float images (F) from [0, 1]. Pillow's own convert("RGB") clips those to 255,
    which stores a bright 16-bit photo as all white: values outside these ranges are Refused."""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise Refused(f"{img.mode} image with values in [{a.min()}, {a.max()}], expected 16-bit 0..65535")
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if np.isfinite(a).any() else (np.nan, np.nan)
            raise Refused(f"floating-point image with values in [{lo:.4g}, {hi:.4g}] "
                          "(or non-finite), expected [0, 1]")
        img = Image.fromarray(np.rint(a * 255.0).astype(np.uint8), "L")
    return img.convert("RGB")


def decode_image(data: bytes, resolution: int | None = None) -> Image.Image:
    """Decode encoded bytes fully (a truncated file raises here, not later). With `resolution`,
    an image of more than max_pixels(resolution) pixels is Refused from its header, undecoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (from ~89 Mpx) fires in open(), before ours can read the size.
        raise Refused(f"decompression bomb? more than {Image.MAX_IMAGE_PIXELS} pixels > the limit of "
                      f"{max_pixels(resolution or 1)} for --resolution {resolution}") from None
    if resolution is not None and img.width * img.height > max_pixels(resolution):
        raise Refused(f"decompression bomb? {img.width}x{img.height} pixels > the limit of "
                      f"{max_pixels(resolution)} for --resolution {resolution}")
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
    return encode(center_crop_resize(decode_image(data, resolution), resolution, allow_upscale), fmt, quality, png_level)
