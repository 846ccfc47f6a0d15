"""L2E: inhibiting monosemantic neurons during pretraining (docs/l2e.md).

functional  the reference math (phi, selection, loss, reverse deactivation, moments, merges)
torch_op    the one torch implementation of up-projection + GELU + L2E (the fused kernel's reference)
stats       running statistics: DP merge in rank order, fp64 folding, exact global k-th largest
threshold   tau: exact-quantile initialisation and the log-space update
backend     torch or Triton forward, chosen once per inhibitor
metrics     per-micro-batch metric sums and their global reduction
plan        forward phase / pass and the pending micro-batch
inhibitor   Inhibitor: buffers, host mirrors, commit (shared by the methods)
methods     L2EInhibitor, MEmeLInhibitor, NeuronInhibitor (builds the configured one)
controller  L2EController (the training loop's door), total_loss, commit_all, metrics_all
keys        is_l2e_state_key
fkr         False Killing Rate and the MS validation quantities (phi_l, phi_-l, l*, K-S)
"""

from . import fkr, functional, stats  # noqa: F401
from .controller import REDUCTIONS, L2EController, commit_all, commit_devices, finish_commits, metrics_all, total_loss
from .inhibitor import Inhibitor
from .keys import is_l2e_state_key
from .methods import L2EInhibitor, MEmeLInhibitor, NeuronInhibitor

__all__ = [
    "NeuronInhibitor",
    "Inhibitor",
    "L2EInhibitor",
    "MEmeLInhibitor",
    "L2EController",
    "total_loss",
    "commit_all",
    "commit_devices",
    "finish_commits",
    "metrics_all",
    "is_l2e_state_key",
    "REDUCTIONS",
    "functional",
    "stats",
    "fkr",
]
