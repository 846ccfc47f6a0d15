"""Resume with a changed config: which differences from the saved config are refused and which are warned about.

Compared on the flat config dicts (``cfg.to_dict()``, the ``neox_config`` saved in every checkpoint), before
anything is built:

* refused (the model would differ from the saved one, in its shapes or in what it computes): the model
  architecture keys (``MODEL_KEYS``) and the set of L2E-inhibited layers (l2e-enabled, l2e-method, the layers
  l2e-layers resolves to). A new run from the saved weights is a finetune-style load (``finetune: true``).
* allowed with one warning line naming each changed key: the L2E settings, the data, the batch and the
  optimizer (``WARN_KEYS``).
* not compared: the run's bookkeeping (train-iters, save / load, logging, the launch; the TP / DP / ZeRO
  layout has its own check, ``check_resume_layout``).
"""

from __future__ import annotations

from typing import List, Mapping, Tuple

MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "pos_emb",
    "rotary_pct",
    "rotary_emb_base",
    "gpt_j_residual",
    "gpt_j_tied",
    "no_weight_tying",
    "norm",
    "layernorm_epsilon",
    "activation",
    "bias_gelu_fusion",
    "output_layer_parallelism",
    "attention_config",
    "use_bias_in_attn_linear",
    "use_bias_in_norms",
)
L2E_SET_KEYS = ("l2e_enabled", "l2e_method", "l2e_layers")
WARN_KEYS = (
    # L2E
    "l2e_ratio",
    "l2e_lambda",
    "l2e_eta",
    "l2e_tau_init",
    "l2e_decay",
    "l2e_min_samples",
    "l2e_warmup_steps",
    "l2e_eps",
    # data
    "data_path",
    "train_data_paths",
    "valid_data_paths",
    "test_data_paths",
    "train_data_weights",
    "valid_data_weights",
    "test_data_weights",
    "split",
    "tokenizer_type",
    "vocab_file",
    "seq_length",
    "max_position_embeddings",
    # batch
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "seed",
    # model regularisation (no shape or function change at inference)
    "hidden_dropout",
    "attention_dropout",
    # optimizer
    "optimizer",
    "lr",
    "min_lr",
    "weight_decay",
    "lr_decay_style",
    "lr_decay_iters",
    "warmup",
    "gradient_clipping",
    "precision",
    "fp16",
    "bf16",
)


def _key(k: str) -> str:
    return k.replace("_", "-")


def _short(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _l2e_layers(d: Mapping) -> tuple:
    """The inhibited layer indices a flat config dict resolves to (empty when L2E is off)."""
    if not d.get("l2e_enabled") or str(d.get("l2e_method", "l2e")).lower() == "none":
        return ()
    try:
        from ..config.loader import resolve_layers

        return tuple(resolve_layers(d.get("l2e_layers"), int(d.get("num_layers"))))
    except Exception:  # noqa: BLE001 - an unresolvable value compares as given
        return (repr(d.get("l2e_layers")),)


def config_changes(saved: Mapping, new: Mapping) -> Tuple[List[str], List[str]]:
    """(refused, warned): "key saved -> new" strings for the keys that differ between two flat config dicts."""
    refused, warned = [], []
    for k in MODEL_KEYS:
        if k in saved and saved.get(k) != new.get(k):
            if k == "intermediate_size" and _ffn(saved) == _ffn(new):
                continue
            if k == "vocab_size" and (saved.get(k) is None or new.get(k) is None):
                continue  # taken from the tokenizer at run time: the shapes check it
            refused.append(f"{_key(k)} {_short(saved.get(k))} -> {_short(new.get(k))}")
    a, b = _l2e_layers(saved), _l2e_layers(new)
    if a != b:
        refused.append(f"L2E layers {list(a) or 'off'} -> {list(b) or 'off'}")
    elif a and str(saved.get("l2e_method")).lower() != str(new.get("l2e_method")).lower():
        refused.append(f"l2e-method {saved.get('l2e_method')} -> {new.get('l2e_method')}")
    for k in WARN_KEYS:
        if k in saved and saved.get(k) != new.get(k):
            if k.startswith("l2e_") and not (a and b):
                continue
            warned.append(f"{_key(k)} {_short(saved.get(k))} -> {_short(new.get(k))}")
    return refused, warned


def _ffn(d: Mapping):
    return d.get("intermediate_size") or 4 * int(d.get("hidden_size") or 0)
