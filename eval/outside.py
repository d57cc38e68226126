"""Samples from outside: a folder of PNG/JPEG images or an ADM / guided-diffusion `.npz` whose
`arr_0` is uint8 [n, H, W, 3], scored without a model (`eval fid --samples PATH`); and the
writers of that `.npz` and of such a folder for our own samples (`eval sample --npz / --png`)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from eval.common import EvalError
from eval.npz_bounds import READ_ERRORS, headers, nbytes
from pipeline.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 4096 * 4096  # a sample image; data_prep's bound on inputs at 256x256
MAX_INFLATED = 16 << 30  # bytes: a compressed arr_0 is inflated whole (50k at 256x256 is 9.8 GB)


class ImageFolder:
    """The images of a folder (sorted by name) as an indexable uint8 [n, H, W, 3] sequence,
    decoded on access; every image must be RGB of the first image's size."""

    def __init__(self, folder: Path):
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise EvalError(f"{folder}: no .png/.jpg/.jpeg images")
        self.shape = self._read(0).shape

    def _read(self, i: int) -> np.ndarray:
        f = self.files[i]
        try:
            with Image.open(f) as im:
                if im.width * im.height > MAX_PIXELS:  # from the header, before decoding
                    raise EvalError(f"{f}: {im.width}x{im.height} pixels; a sample image is at most {MAX_PIXELS:,} "
                                    "pixels (4096x4096)")
                x = np.array(im.convert("RGB") if im.mode in ("L", "RGB", "P", "RGBA") else im)
        except (OSError, Image.DecompressionBombError) as e:
            raise EvalError(f"{f}: cannot decode ({str(e)[:200]})") from None
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise EvalError(f"{f}: need 8-bit RGB, got mode {x.dtype} {x.shape}")
        return x

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        x = self._read(i)
        if i and x.shape != self.shape:
            raise EvalError(f"{self.files[i]}: {x.shape[1]}x{x.shape[0]}, the other images are "
                            f"{self.shape[1]}x{self.shape[0]}")
        return x


def check_images(x: np.ndarray, where) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or min(x.shape) == 0:
        raise EvalError(f"{where}: need uint8 images [n, H, W, 3] (NHWC), got {x.dtype} {list(x.shape)}")
    return x


def load_outside(path: str | os.PathLike):
    """Indexable uint8 [n, H, W, 3] images of a folder or of an `.npz`'s `arr_0`."""
    p = Path(path)
    if p.is_dir():
        return ImageFolder(p)
    if not p.is_file():
        raise EvalError(f"--samples {path}: no such folder or .npz file")
    h = headers(p)  # shapes and dtypes first: a compressed member is inflated only once accepted
    if "arr_0" not in h:
        raise EvalError(f"{p}: no 'arr_0' array (the ADM sample format; has {', '.join(h) or 'nothing'})")
    shape, dtype, compressed = h["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or min(shape) == 0:
        raise EvalError(f"{p}: need uint8 images [n, H, W, 3] (NHWC), got {dtype} {list(shape)}")
    if compressed and nbytes(shape, dtype) > MAX_INFLATED:
        raise EvalError(f"{p}: arr_0 is compressed and {nbytes(shape, dtype) / 2**30:.1f} GiB inflated; a compressed "
                        f"one is read whole, at most {MAX_INFLATED >> 30} GiB: save it with np.savez (read lazily)")
    try:
        x = _stored_member(p, "arr_0.npy")  # 50k at 256x256 is 9.8 GB: map it, never copy it per process
        if x is None:
            with np.load(p, allow_pickle=False) as z:
                x = z["arr_0"]
    except READ_ERRORS as e:  # truncated, or altered after its header
        raise EvalError(f"{p}: not a readable .npz of images ({type(e).__name__}: {str(e)[:100]})") from None
    return check_images(x, p)


def _stored_member(path: Path, name: str) -> np.ndarray | None:
    """A read-only memory map of an uncompressed (np.savez) .npz member, or None when the member
    is missing or compressed (np.savez_compressed: then it is read whole)."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(name)
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths are at 26..30
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"'{name}' holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def write_adm_npz(path: str | os.PathLike, parts, shape: tuple[int, int, int, int]) -> Path:
    """Write uint8 images, given as consecutive parts (arrays [k, H, W, 3]) that make up `shape`,
    as `arr_0` of an `.npz` (what guided-diffusion's evaluator reads), streaming part by part:
    50,000 samples at 256x256 never sit in memory at once. The file is what np.savez writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
                for part in parts:
                    check_images(part, path)
                    if part.shape[1:] != tuple(shape[1:]):
                        raise EvalError(f"{path}: a part of shape {part.shape} among images {shape}")
                    f.write(np.ascontiguousarray(part).tobytes())
                    written += len(part)
        if written != shape[0]:
            raise EvalError(f"{path}: {written} images written, {shape[0]} expected")
    return path


def write_png_folder(folder: str | os.PathLike, chunk_files, total: int) -> int:
    """Each sample of the chunk files as FOLDER/<global index>.png (zero-padded, so name order is
    index order: what pytorch-fid and clean-fid read). A name is made from an integer read from
    the chunk, never from text, so nothing is written outside FOLDER. Returns the images written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(total - 1, 0))))
    written = 0
    for f in chunk_files:
        with np.load(f, allow_pickle=False) as z:
            images, indices = check_images(z["images"], f), z["indices"]
        if indices.ndim != 1 or len(indices) != len(images) or indices.dtype.kind not in "iu":
            raise EvalError(f"{f}: its indices do not match its images")
        for i, im in zip(indices.tolist(), images):
            if not 0 <= i < total:
                raise EvalError(f"{f}: sample index {i} outside [0, {total})")
            with atomic_path(folder / f"{i:0{width}d}.png") as tmp:  # a killed job leaves no half image
                Image.fromarray(im).save(tmp, format="PNG")
            written += 1
    return written
