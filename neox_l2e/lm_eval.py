"""lm-evaluation-harness's own command line with this project's model registered as ``neox_l2e``.

    python -m neox_l2e.lm_eval --model neox_l2e --model_args checkpoint=runs/demo/checkpoints \
        --tasks local_tiny_shakespeare --include_path configs/eval --num_fewshot 5 --output_path runs/eval/h

Every option is lm-eval's (``python -m neox_l2e.lm_eval --help``); model_args: checkpoint (our checkpoint folder
or a Hugging Face folder), tokenizer, tag, dtype, max_length, batch_size, device. lm-eval 0.4 finds models
only in its own registry (no plugin entry points), so this module imports the adapter, which registers it,
and then runs lm-eval's CLI. Set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 to keep it offline.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import neox_l2e.analysis.lm_adapter  # noqa: F401  (registers the "neox_l2e" model)

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
