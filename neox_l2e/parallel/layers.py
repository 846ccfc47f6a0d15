"""Tensor-parallel building blocks: collective autograd functions, column/row-parallel linears,
the vocab-parallel embedding and cross-entropy. With tp == 1 each is its plain torch counterpart.

Every parameter of these layers carries ``tp_partition_dim`` (the dim split across TP ranks, or None
when replicated) so checkpoint tools can gather or re-split it, and DeepSpeed's marks
``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` (mark_tp_param), which its
gradient-norm code reads: a parameter without the mark is counted on TP rank 0 only.
Not torch.distributed.nn.functional.all_reduce: its backward is an all-reduce too, which would
multiply gradients by the TP degree (see docs).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .state import ParallelState

#: op(x_local, weight, bias) -> y: what a ColumnParallelLinear applies to its prepared input (F.linear by default)
LinearOp = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient over the TP group backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce (sum) forward over the TP group, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone(memory_format=torch.contiguous_format)  # never reduce the caller's tensor in place
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the last dim across the TP group forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.rank, ctx.world = rank, world
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.world, dim=-1)[ctx.rank].contiguous(), None, None, None


def mark_tp_param(p: torch.Tensor, partition_dim: Optional[int]) -> torch.Tensor:
    """Record how ``p`` is split across TP ranks (None = replicated: every TP rank holds all of it)."""
    p.tp_partition_dim = partition_dim
    p.tensor_model_parallel = partition_dim is not None
    p.partition_dim = partition_dim if partition_dim is not None else -1
    p.partition_stride = 1
    return p


def copy_to_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return _CopyToTP.apply(x, ps.tp_group) if ps.tp > 1 else x


def reduce_from_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return _ReduceFromTP.apply(x, ps.tp_group) if ps.tp > 1 else x


def gather_from_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return _GatherFromTP.apply(x, ps.tp_group, ps.tp_rank, ps.tp) if ps.tp > 1 else x


def init_sharded_(
    param: torch.Tensor,
    full_shape: tuple,
    partition_dim: Optional[int],
    ps: ParallelState,
    init_fn: Callable[[torch.Tensor], None],
    generator: torch.Generator,
    init_rows: Optional[int] = None,
) -> None:
    """Initialise the full (unsharded) tensor from ``generator`` and copy this rank's slice into ``param``,
    so that any TP degree starts from the same model.

    ``init_rows`` (vocab-parallel weights): only the first ``init_rows`` rows are drawn, the rest (the
    extra vocab padding a TP degree above 1 adds) are zero, so the draw does not depend on the TP degree."""
    full = torch.zeros(full_shape, dtype=torch.float32)
    if init_rows is not None and init_rows < full_shape[0]:
        head = torch.empty((init_rows,) + tuple(full_shape[1:]), dtype=torch.float32)
        init_fn(head, generator)
        full[:init_rows] = head
    else:
        init_fn(full, generator)
    if partition_dim is not None and ps.tp > 1:
        full = full.chunk(ps.tp, dim=partition_dim)[ps.tp_rank]
    with torch.no_grad():
        param.copy_(full.to(param.dtype))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each TP rank computes out_features / tp outputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ps: ParallelState,
        bias: bool = True,
        gather_output: bool = False,
        dtype=None,
    ):
        super().__init__()
        if out_features % ps.tp:
            raise ValueError(f"output size {out_features} is not divisible by the TP degree {ps.tp}")
        self.ps, self.gather_output = ps, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_tp_param(
            nn.Parameter(torch.empty(out_features // ps.tp, in_features, device=ps.device, dtype=dtype)), 0
        )
        if bias:
            self.bias = mark_tp_param(
                nn.Parameter(torch.zeros(out_features // ps.tp, device=ps.device, dtype=dtype)), 0
            )
        else:
            self.register_parameter("bias", None)

    def scatter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as this layer sees it (gradients all-reduced over TP in backward)."""
        return copy_to_tp(x, self.ps)

    def forward(self, x: torch.Tensor, op: Optional[LinearOp] = None) -> torch.Tensor:
        """``op(x_local, weight, bias)`` (default F.linear: x W^T + b) on this rank's prepared input and weight
        shard, then the output gather when ``gather_output``. An op that fuses more than the product (the MLP's
        activation, the L2E inhibitor) goes through the same TP input and output handling as the plain product."""
        y = (op or F.linear)(self.scatter_input(x), self.weight, self.bias)
        return gather_from_tp(y, self.ps) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial products are summed over TP, then the
    bias is added once (GPT-NeoX adds it on every rank before the all-reduce, so it counts tp times there)."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, bias: bool = True, dtype=None):
        super().__init__()
        if in_features % ps.tp:
            raise ValueError(f"input size {in_features} is not divisible by the TP degree {ps.tp}")
        self.ps = ps
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_tp_param(
            nn.Parameter(torch.empty(out_features, in_features // ps.tp, device=ps.device, dtype=dtype)), 1
        )
        if bias:
            # replicated; added once, after the reduce (its gradient is the same on every TP rank)
            self.bias = mark_tp_param(nn.Parameter(torch.zeros(out_features, device=ps.device, dtype=dtype)), None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x_parallel: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x_parallel, self.weight), self.ps)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across TP ranks; out-of-shard ids contribute zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ps: ParallelState, dtype=None):
        super().__init__()
        if num_embeddings % ps.tp:
            raise ValueError(f"vocab {num_embeddings} is not divisible by the TP degree {ps.tp}")
        self.ps = ps
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = num_embeddings // ps.tp
        self.vocab_start, self.vocab_end = ps.tp_rank * per, (ps.tp_rank + 1) * per
        self.weight = mark_tp_param(nn.Parameter(torch.empty(per, embedding_dim, device=ps.device, dtype=dtype)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.ps)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ps: ParallelState, vocab_limit: Optional[int]):
        # logits: [..., V/tp] (this rank's vocab slice); target: [...] global ids
        logits = logits.float()
        per = logits.size(-1)
        start = ps.tp_rank * per
        if vocab_limit is not None and start + per > vocab_limit:
            # TP vocab padding: columns at global index >= vocab_limit take no part in the softmax
            cols = torch.arange(start, start + per, device=logits.device)
            logits = logits.masked_fill(cols >= vocab_limit, float("-inf"))
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=ps.tp_group)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + per)
        local = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=ps.tp_group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=ps.tp_group)
        loss = sum_exp.log() - picked
        exp.div_(sum_exp.unsqueeze(-1))  # softmax of this slice
        ctx.save_for_backward(exp, local, outside)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside)
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ps: ParallelState, vocab_limit: Optional[int] = None
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) with the vocab dim of ``logits`` split across TP ranks.

    ``vocab_limit``: logits of global vocab index >= vocab_limit are left out of the softmax. The model
    passes the vocab padded for TP=1, so the extra padding a higher TP degree adds changes nothing and
    every TP degree computes the same loss."""
    if ps.tp == 1:
        if vocab_limit is not None and logits.size(-1) > vocab_limit:
            logits = logits[..., :vocab_limit]
        return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target, ps, vocab_limit)
