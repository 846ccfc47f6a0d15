"""Parallel state (groups) and tensor-parallel layers. No module-level process-group globals."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp, gather_from_tp,
                     init_sharded_, mark_tp_param, reduce_from_tp, vocab_parallel_cross_entropy)
from .random import RNGTracker
from .state import (LaunchError, LaunchInfo, ParallelState, apply_launch_env, collective_failure_message,
                    collective_timeout, default_backend, default_device, init_distributed, is_collective_failure,
                    launch_info, set_collective_timeout, start_heartbeat)

__all__ = ["ParallelState", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "copy_to_tp",
           "reduce_from_tp", "gather_from_tp", "init_sharded_", "mark_tp_param", "RNGTracker", "vocab_parallel_cross_entropy", "default_backend",
           "default_device", "init_distributed", "LaunchError", "LaunchInfo", "launch_info", "apply_launch_env",
           "set_collective_timeout", "collective_timeout", "start_heartbeat", "collective_failure_message",
           "is_collective_failure"]
