"""Unpickle the CIFAR-10 "python version" batches without running anything they might hold.

A pickle is a program: `pickle.load` calls whatever global a file names (`os.system`, ...). The
CIFAR-10 batches only need a dict of bytes keys, lists of ints and bytes, and one numpy uint8
array, so this unpickler admits exactly the globals that build numpy arrays and dtypes and
refuses every other one with one line, before calling it.
"""

from __future__ import annotations

import io
import pickle

# (module, name) pairs that numpy arrays pickle to, in numpy 1.x and 2.x layouts.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    # Protocol-2 pickles written by Python 3 rebuild bytes with _codecs.encode(str, "latin1"):
    # it only encodes text, so a re-pickled copy of the batches loads too.
    ("_codecs", "encode"),
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside ALLOWED."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise RefusedPickle(f"refused: the pickle calls {module[:60]}.{name[:60]}, which a CIFAR-10 "
                                "batch never holds (only numpy arrays are admitted)")
        return super().find_class(module, name)


def loads(data: bytes, encoding: str = "bytes"):
    """pickle.loads restricted to ALLOWED globals; RefusedPickle for anything else."""
    return _Restricted(io.BytesIO(data), encoding=encoding).load()


def load(f, encoding: str = "bytes"):
    return _Restricted(f, encoding=encoding).load()
