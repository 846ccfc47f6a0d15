"""L2E: inhibiting monosemantic neurons during pretraining (docs/l2e.md).

    functional  the reference math (phi, selection, loss, reverse deactivation, moments, merges)
    stats       running statistics: DP merge in rank order, fp64 folding, exact global k-th largest
    inhibitor   NeuronInhibitor (the MLP's L2E / MEmeL unit), total_loss, commit_all, metrics_all
    fkr         False Killing Rate and the MS validation quantities (phi_l, phi_-l, l*, K-S)
"""
from . import fkr, functional, stats  # noqa: F401
from .inhibitor import NeuronInhibitor, commit_all, metrics_all, total_loss

__all__ = ["NeuronInhibitor", "total_loss", "commit_all", "metrics_all", "functional", "stats", "fkr"]
