"""Parallel state (groups) and tensor-parallel layers. No module-level process-group globals."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp, gather_from_tp,
                     init_sharded_, mark_tp_param, reduce_from_tp, vocab_parallel_cross_entropy)
from .random import RNGTracker
from .state import (LaunchError, LaunchInfo, ParallelState, apply_launch_env, default_backend, default_device, init_distributed,
                    launch_info)

__all__ = ["ParallelState", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "copy_to_tp",
           "reduce_from_tp", "gather_from_tp", "init_sharded_", "mark_tp_param", "RNGTracker", "vocab_parallel_cross_entropy", "default_backend",
           "default_device", "init_distributed", "LaunchError", "LaunchInfo", "launch_info", "apply_launch_env"]
