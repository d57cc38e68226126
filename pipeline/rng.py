"""The one home of determinism: seeds, named random streams and per-sample generators.

Every random draw of the pipeline is a function of (seed, stream, position), never of how long a
process has run, how many processes there are or how samples are batched:
- training draws from `mix_seed(seed, STREAM_*, ...)`: t and eps of Algorithm 1 per sample
  position, dropout per (rank, step, micro-step), the sample grids per slot;
- evaluation draws sample i from `eval_seed(seed, i)` (numpy's SeedSequence: the derivation
  recorded by existing results.json protocols, kept so their samples reproduce);
- the data order and flips are numpy PCG64 streams seeded with (seed, epoch) in `pipeline.data`.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence, Union

import numpy as np
import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]

# The training streams drawn from mix_seed(seed, STREAM, ...): never reuse a number.
STREAM_DIFFUSION = 1  # t and eps of Algorithm 1, per global sample position
STREAM_DROPOUT = 2  # dropout masks, per (rank, step, micro-step)
STREAM_SAMPLE_GRID = 3  # the EMA sample grid written during training, per slot


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stream_generators(seed: int, stream: int, positions: Iterable[int], device) -> list[torch.Generator]:
    """One generator per position of a training stream: mix_seed(seed, stream, position)."""
    return [torch.Generator(device=device).manual_seed(mix_seed(seed, stream, p)) for p in positions]


def eval_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed for evaluation sample `index`: independent streams per (base seed, index),
    so a sample never depends on the batch, the process or the world size it is drawn in."""
    return int(np.random.SeedSequence([int(base_seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def eval_generators(base_seed: int, indices: Iterable[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(eval_seed(base_seed, i)) for i in indices]


def randn_like_batch(shape, generator: Generator = None, device=None, dtype=torch.float32):
    """Standard normal noise of `shape` ([B, ...]).

    `generator` may be one `torch.Generator` (one stream for the batch) or a list of B
    generators: then sample i draws from generator i only, so a sample's noise does not
    depend on which batch it is drawn in or how large that batch is.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype)
                        for g in generator])
