"""Analysis and evaluation: monosemanticity scans, FKR, lm-evaluation-harness, run comparison.

    loading.py      a model (+ tokenizer) from our checkpoint folder or a Hugging Face GPTNeoX folder
    labelled.py     labelled text (jsonl: text, label) -> token windows with a label per token; the
                    no-download labelled dataset (code languages + English)
    scan.py         streaming MLP-activation statistics: phi_l / phi_-l, l*, K-S, FKR (per-token, global)
    plots.py        the figures (per-layer curves by model size, histograms, FKR curves)
    lm_adapter.py   lm_eval.api.model.LM over our model + our tokenizer
    evaluation.py   task files, offline lm-eval runs, result tables
    runs.py         reading runs/<name>/metrics.jsonl, side-by-side comparison

Library code raises ``AnalysisError`` (one line); the tools in tools/ print it and exit 2.
"""

from .common import AnalysisError

__all__ = ["AnalysisError"]
