"""Which model state keys hold L2E state (the inhibitors' buffers). Imports nothing, so any layer may use it."""

from __future__ import annotations

#: the MLP attribute that holds a layer's inhibitor (``...mlp.inhibitor.count``)
INHIBITOR_ATTR = "inhibitor"


def is_l2e_state_key(key: str) -> bool:
    """True for a state_dict key of an L2E inhibitor buffer (count, mean, m2, tau, step, ...), at any prefix."""
    return f".{INHIBITOR_ATTR}." in key or key.startswith(f"{INHIBITOR_ATTR}.")
