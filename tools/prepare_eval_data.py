#!/usr/bin/env python
"""Turn task files you have (the usual public layouts of ARC, MMLU, PIQA, SciQ, LAMBADA) into the jsonl files
tools/evaluate.py reads (DIR/<task>.jsonl, DIR/<task>.fewshot.jsonl). Offline: it only reads the files given.

    python tools/prepare_eval_data.py arc_easy ARC-Easy/test-00000-of-00001.parquet
    python tools/prepare_eval_data.py arc_challenge ARC-V1-Feb2018/ARC-Challenge/ARC-Challenge-Test.jsonl
    python tools/prepare_eval_data.py mmlu mmlu/all/test-00000-of-00001.parquet \
        --fewshot mmlu/all/dev-00000-of-00001.parquet
    python tools/prepare_eval_data.py mmlu data/test --fewshot data/dev        # the original csv folders
    python tools/prepare_eval_data.py piqa valid.jsonl --labels valid-labels.lst
    python tools/prepare_eval_data.py sciq SciQ/test.json
    python tools/prepare_eval_data.py lambada lambada_test.jsonl               # or lambada_test_plain_text.txt

Inputs: .jsonl, .json, .parquet (pyarrow), .csv (MMLU's original files), .txt (LAMBADA's plain text), or a
folder of them. docs/analysis.md lists the layouts each task accepts. Writes OUT_DIR/TASK.jsonl (and
TASK.fewshot.jsonl with --fewshot) and prints the count.
"""

from __future__ import annotations

import sys

from neox_l2e.analysis.cli import parser, run_main  # noqa: E402


def main(argv):
    from neox_l2e.analysis.eval_data import CONVERTERS

    p = parser(__doc__)
    p.add_argument("task", choices=sorted(CONVERTERS), help="the local task to write")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="the task's test (or validation) file(s) or folder")
    p.add_argument(
        "--fewshot",
        nargs="+",
        default=None,
        metavar="INPUT",
        help="file(s) for the few-shot pool (MMLU: the dev split; others: the train split)",
    )
    p.add_argument("--labels", default=None, help="PIQA's labels file (valid-labels.lst) for inputs without labels")
    p.add_argument("--fewshot-labels", default=None, help="the labels file of the --fewshot inputs (PIQA)")
    p.add_argument("--out-dir", default="data/eval", help="folder to write TASK.jsonl into (default data/eval)")
    args = p.parse_args(argv)
    from pathlib import Path

    from neox_l2e.analysis.eval_data import convert, write_rows
    from neox_l2e.analysis.evaluation import TASKS, _check_jsonl

    out = Path(args.out_dir)
    jobs = [(args.inputs, args.labels, out / f"{args.task}.jsonl")]
    if args.fewshot:
        jobs.append((args.fewshot, args.fewshot_labels, out / f"{args.task}.fewshot.jsonl"))
    converted = [(convert(args.task, inputs, labels), path) for inputs, labels, path in jobs]  # all read first
    for rows, path in converted:
        write_rows(rows, path)
        n = _check_jsonl(path, TASKS[args.task][2])
        print(f"wrote {path} ({n} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
