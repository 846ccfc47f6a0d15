"""The Pythia / GPT-NeoX model (gpt_neox.py), its MLP (mlp.py, the door to L2E) and rotary embeddings."""

from .gpt_neox import GPTNeoX, ModelOutput
from .mlp import MLP

__all__ = ["GPTNeoX", "MLP", "ModelOutput"]
