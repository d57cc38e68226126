"""The original's gradient clipping per TPU core, on any number of processes (`train.clip_scope`).

The original trained on 8 TPU cores (per-core batch 16 on CIFAR-10, 8 at 256x256) with
`tf.tpu.CrossShardOptimizer` (reduction MEAN) around Adam, and clipped in between
(`diffusion_tf/utils.py: make_optimizer`, called by `tpu_utils.run_training` with
`grad_clip=grad_clip / num_tpu_replicas()`):

    grads = CrossShardOptimizer.compute_gradients(loss)   # g_k / N: the loss is scaled by 1/N
    grads = tf.clip_by_global_norm(grads, grad_clip / N)  # on each core, before any sum
    CrossShardOptimizer.apply_gradients(grads)            # cross_replica_sum, then Adam

so the update direction is  sum_k clip(g_k / N, c / N) = mean_k clip(g_k, c)  over the N
cores, g_k the gradient of core k's mean loss, clip(v, c) = v * c / max(||v||, c): each core's
gradient clipped to norm c, then averaged. With one core it is global clipping.
`clip_scope: global` (the default) clips the averaged gradient instead: clip(mean_k g_k, c).

`clip_scope: replica` reproduces the original with `train.clip_replicas` virtual replicas
(cores): each replica is one micro-batch of global_batch_size / clip_replicas samples on one
process, so the result does not depend on how the replicas are spread over processes. All
micro-steps run without DDP's all-reduce; each micro-step's gradient is clipped as its core's
was and added to a buffer, and the buffers are summed over processes once per step.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from pipeline.config import RecipeError, TrainConfig


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """tf.clip_by_global_norm's factor: c / max(||v||, c) (1 when the norm is under c)."""
    return max_norm / torch.clamp(norm, min=max_norm)


def replica_micro_batch(tc: TrainConfig, world: int) -> Optional[int]:
    """The per-process micro batch: the recipe's, or in replica scope one replica's samples
    (global_batch_size / clip_replicas), which needs clip_replicas to be a multiple of `world`."""
    if tc.clip_scope != "replica":
        return tc.micro_batch_size
    size = tc.global_batch_size // tc.clip_replicas
    if tc.clip_replicas % world:
        raise RecipeError(f"train.clip_replicas={tc.clip_replicas} is not a multiple of the {world} "
                          f"processes (each process holds whole replicas)")
    if tc.micro_batch_size not in (None, size):
        raise RecipeError(f"train.micro_batch_size={tc.micro_batch_size}: with clip_scope replica a "
                          f"micro-batch is one replica, global_batch_size / clip_replicas = {size}")
    return size


class ReplicaClipper:
    """Clip each replica's gradient as the original clipped each core's, then sum (see above).

    `begin()` before a step's first backward, `take()` after each micro-step's backward (p.grad
    holds that replica's gradient divided by the accumulation steps, Accelerate's scaling),
    `finish()` before the optimizer step.

    Cost per micro-step: one norm over all tensors, then the replica's share added into the
    buffer, never a Python per-tensor loop or a flatten on one process. Across processes,
    `finish()` sums the buffers in buckets of `bucket_mb` with asynchronous all-reduces, so one
    bucket's transfer overlaps the next one's packing. No host sync: the returned norm stays on
    the device until someone logs it."""

    def __init__(self, params: Iterable[torch.nn.Parameter], max_norm: float, world: int, replicas: int,
                 bucket_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.max_norm, self.world, self.replicas = float(max_norm), world, replicas
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.buf: Optional[list[torch.Tensor]] = None
        self.weight: Optional[torch.Tensor] = None  # off CUDA: the sum so far is weight * buf
        self.norm_sum: Optional[torch.Tensor] = None
        # Off CUDA, two sets of tensors that take turns as the buffer and as p.grad (see _add_host).
        self.grad_set: Optional[list[torch.Tensor]] = None
        self.other_set: Optional[list[torch.Tensor]] = None

    def begin(self) -> None:
        self.buf, self.weight, self.norm_sum = None, None, None
        if self.grad_set is not None:  # zeroed by the last take(): the first backward adds into it
            for p, g in zip(self.params, self.grad_set):
                p.grad = g

    @torch.no_grad()
    def take(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # p.grad = g_k / accum, so ||g_k|| = ||p.grad|| * accum, accum = replicas / world.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) * (self.replicas / self.world)
        self.norm_sum = norm if self.norm_sum is None else self.norm_sum + norm
        # This replica's share of the mean, clip(g_k, c) / N = clip_factor * p.grad / world.
        share = clip_factor(norm, self.max_norm) / self.world
        if grads[0].is_cuda:
            self._add_cuda(grads, share)
        else:
            self._add_host(grads, share)

    def _add_cuda(self, grads: list[torch.Tensor], share: torch.Tensor) -> None:
        """Scale and add: two multi-tensor kernels. The next backward writes fresh tensors, which
        the caching allocator hands out for free, instead of adding into the buffer."""
        torch._foreach_mul_(grads, share)
        if self.buf is None:
            self.buf = grads  # the first replica's tensors are the buffer: no copy
        else:
            torch._foreach_add_(self.buf, grads)
        for p in self.params:
            p.grad = None

    def _add_host(self, grads: list[torch.Tensor], share: torch.Tensor) -> None:
        """Off CUDA a foreach op is a per-tensor loop, each pass over the gradients costs memory
        traffic, and fresh gradient tensors are fresh pages from the OS (faulting them in costs
        about 8 passes). So the buffer holds the shares' weighted mean (sum = weight * buf), which
        one lerp per tensor updates (3 passes, where a scale and an add make 5); and two sets of
        tensors take turns as the buffer and as p.grad, zeroed after each take() so that the
        next backward adds into them in place, as global clipping's accumulation does. The price:
        both sets stay allocated between steps, one gradient's size more than global holds."""
        if self.buf is None:
            # This step's first replica: its tensors become the buffer, and the other set (the
            # last step's buffer, which the optimizer has used) becomes the gradients.
            self.buf, self.weight = grads, share
            grads, self.other_set = self.other_set, grads
            if grads is None:  # the very first step: the next backward writes fresh tensors
                for p in self.params:
                    p.grad = None
                return
            for p, g in zip(self.params, grads):
                p.grad = g
        else:
            # weight' * buf' = weight * buf + share * grads, with buf' = lerp(buf, grads, share / weight')
            self.weight = self.weight + share
            torch._foreach_lerp_(self.buf, grads, [share / self.weight] * len(grads))
        torch._foreach_zero_(grads)  # already p.grad: the next backward adds into them
        self.grad_set = grads

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """Sum the clipped replica gradients over processes into p.grad (= mean_k clip(g_k, c));
        returns the mean pre-clip norm ||g_k|| over the replicas (a 0-dim tensor, not read)."""
        assert self.buf is not None, "ReplicaClipper.finish() before any take()"
        norm_sum = self.norm_sum.reshape(1)
        if self.weight is not None:
            torch._foreach_mul_(self.buf, self.weight)
        if self.world > 1:
            self._all_reduce_sum(self.buf + [norm_sum])
        for p, b in zip(self.params, self.buf):
            p.grad = b  # autograd's own tensor, in the parameter's layout (channels_last on CUDA)
        self.buf, self.weight, self.norm_sum = None, None, None
        return norm_sum[0] / self.replicas

    def _all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum over processes: buckets of ~bucket_bytes, all launched before any wait."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        buckets, size = [[]], 0
        for t in tensors:
            if size >= self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel() * t.element_size()
        pending = []
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            for t, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(summed)


def make_clipper(tc: TrainConfig, model: torch.nn.Module, world: int, deepspeed: bool,
                 precision: str) -> Optional[ReplicaClipper]:
    """The clipper of `clip_scope: replica`, None for global (the trainer's clip_grad_norm_)."""
    if tc.clip_scope != "replica":
        return None
    if deepspeed:
        raise RecipeError("train.clip_scope=replica: DeepSpeed clips inside its engine; use clip_scope global")
    if precision == "fp16":
        raise RecipeError("train.clip_scope=replica: fp16's loss scaling is not supported; use bf16 or no")
    return ReplicaClipper(model.parameters(), tc.grad_clip, world, tc.clip_replicas)
