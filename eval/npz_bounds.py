"""`.npz` files from outside (reference statistics, ADM sample files) read with their sizes known
first. Each member's shape and dtype come from its `.npy` header, a few hundred bytes that
are read, also from a compressed member, without inflating the rest: a compressed bomb is
refused before it is inflated, an object array (it would need unpickling) before anything.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from eval.common import EvalError

# What reading a damaged .npz raises: zip structure, inflate, .npy header.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def headers(path: str | Path) -> dict[str, tuple[tuple, np.dtype, bool]]:
    """{member name without .npy: (shape, dtype, compressed)}; EvalError naming the file when it
    is not a readable .npz."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (shape, dtype, info.compress_type != zipfile.ZIP_STORED)
    except READ_ERRORS as e:
        raise EvalError(f"{path}: not a readable .npz ({type(e).__name__}: {str(e)[:100]})") from None
    return out


def nbytes(shape: tuple, dtype: np.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
