"""Parallel state (groups) and tensor-parallel layers. No module-level process-group globals."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp, gather_from_tp,
                     init_sharded_, mark_tp_param, reduce_from_tp, vocab_parallel_cross_entropy)
from .random import RNGTracker
from .state import ParallelState, default_backend, default_device, init_distributed

__all__ = ["ParallelState", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "copy_to_tp",
           "reduce_from_tp", "gather_from_tp", "init_sharded_", "mark_tp_param", "RNGTracker", "vocab_parallel_cross_entropy", "default_backend",
           "default_device", "init_distributed"]
