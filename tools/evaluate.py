#!/usr/bin/env python
"""Evaluate checkpoints with lm-evaluation-harness, offline, on task files on disk.

Tasks (configs/eval/*.yaml, the harness's prompts): arc_easy, arc_challenge, sciq, mmlu, piqa, lambada
('paper' = all six), and tiny_shakespeare (a small multiple-choice set built from the default corpus, made
on first use). Data: DIR/<task>.jsonl from --data-dir (default data/eval), or --task-file TASK=FILE; an
optional DIR/<task>.fewshot.jsonl is the few-shot pool. docs/analysis.md lists each task's jsonl fields.

tools/prepare_eval_data.py turns the public ARC, MMLU, PIQA, SciQ and LAMBADA files into these jsonl files.
Other harness tasks: a task YAML path in --tasks, or a task name whose yaml is in an --include_path folder.

Backends: 'adapter' (our model + our tokenizer as an lm_eval LM; works for every checkpoint, including
SentencePiece-tokenized runs), 'hf' (lm-eval's own hf model on a Hugging Face folder whose tokenizer
AutoTokenizer loads, e.g. a real Pythia folder), 'auto' (hf for such folders, adapter otherwise).
A prompt longer than the model's context is cut on the left (its first few-shot examples go): the tool says
how many were, per task and shot count.

    python tools/evaluate.py runs/demo/checkpoints --tasks tiny_shakespeare --shots 0,5
    python tools/evaluate.py base=runs/base/hf l2e=runs/l2e/hf --tasks paper --data-dir data/eval --shots 0,5
    python tools/evaluate.py runs/demo/checkpoints --tasks my_task --include_path my_tasks/ --log_samples
Writes OUT.json (all results) and OUT.md (the table), with --log_samples OUT.samples/ (one jsonl of lm-eval's
per-example records per model, shot count and task); prints the table.
"""

from __future__ import annotations

import sys
import time

from neox_l2e.analysis.cli import parser, resolve_device_dtype, run_main, split_named  # noqa: E402


def _hf_tokenizer_loads(path) -> bool:
    from pathlib import Path

    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "tokenizer_config.json").is_file()


def write_jsonl_records(rows, path) -> None:
    """lm-eval's sample records, one JSON object a line (non-finite floats as null, other objects as text)."""
    import json
    import math
    from pathlib import Path

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(clean(r), ensure_ascii=False) + "\n")


def main(argv):
    p = parser(__doc__)
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT", help="our checkpoint folder or a HF folder; NAME=PATH"
    )
    p.add_argument(
        "--tasks",
        default="tiny_shakespeare",
        help="comma-separated: local tasks (arc_easy, ..., tiny_shakespeare, 'paper' = the six of the "
        "paper), task YAML paths, or task names from --include_path (default tiny_shakespeare)",
    )
    p.add_argument(
        "--include_path",
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of harness task yamls whose tasks --tasks may name (repeatable)",
    )
    p.add_argument(
        "--log_samples",
        "--log-samples",
        action="store_true",
        help="also write lm-eval's per-example records (prompts, answers, scores) to OUT.samples/",
    )
    p.add_argument("--data-dir", default="data/eval", help="folder with <task>.jsonl files (default data/eval)")
    p.add_argument("--task-file", action="append", default=[], metavar="TASK=FILE", help="a task's jsonl (repeatable)")
    p.add_argument("--shots", default="0", help="comma-separated few-shot counts (default 0; the paper: 0,5)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction")
    p.add_argument("--backend", default="auto", choices=("auto", "adapter", "hf"))
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer file or folder for the adapter (default: the checkpoint's)"
    )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="requests scored per forward pass (default 8); lower it if the GPU runs out of memory",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1 ... (default auto)",
    )
    p.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="for the stderr of non-mean metrics")
    p.add_argument("--tiny-size", type=int, default=60, help="examples in the tiny_shakespeare set when built")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="runs/eval/results", help="output path without extension (default runs/eval/results)"
    )
    args = p.parse_args(argv)

    from pathlib import Path

    from neox_l2e.analysis.common import AnalysisError
    from neox_l2e.analysis.evaluation import (
        build_lm,
        build_tiny_shakespeare,
        evaluate,
        resolve_tasks,
        results_table,
        split_task_specs,
        truncation_warnings,
    )
    from neox_l2e.analysis.loading import detect_layout
    from neox_l2e.analysis.report import write_json

    for d in args.include_path:
        if not Path(d).is_dir():
            raise AnalysisError(f"--include_path {d}: not a folder")
    tasks, extra_tasks = split_task_specs(args.tasks, args.include_path)
    try:
        shots = sorted({int(s) for s in args.shots.split(",") if s.strip()})
    except ValueError:
        raise AnalysisError(f"--shots {args.shots!r}: expected comma-separated integers") from None
    files = {}
    for spec in args.task_file:
        if "=" not in spec:
            raise AnalysisError(f"--task-file {spec!r}: expected TASK=FILE")
        t, f = spec.split("=", 1)
        files[resolve_tasks(t)[0] if not t.endswith(".fewshot") else resolve_tasks(t[:-8])[0] + ".fewshot"] = f
    if "tiny_shakespeare" in tasks and "tiny_shakespeare" not in files:
        tiny = Path(args.data_dir) / "tiny_shakespeare.jsonl"
        if not tiny.is_file():
            build_tiny_shakespeare(tiny, n=args.tiny_size, seed=args.seed)
            print(f"[eval] built {tiny} ({args.tiny_size} examples from the default corpus)", file=sys.stderr)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    device, dtype = resolve_device_dtype(args)
    runs = []
    for spec in args.checkpoints:
        name, path = split_named(spec)
        layout = detect_layout(path)
        backend = args.backend
        if backend == "auto":
            backend = "hf" if layout == "hf" and _hf_tokenizer_loads(path) and not args.tokenizer else "adapter"
        if backend == "hf":
            if layout != "hf":
                raise AnalysisError(
                    f"{path}: --backend hf needs a Hugging Face folder (export ours with tools/convert_hf.py export)"
                )
            lm = (
                "hf",
                {
                    "pretrained": str(Path(path).resolve()),
                    "dtype": str(dtype).replace("torch.", ""),
                    **({"max_length": args.max_length} if args.max_length else {}),
                },
            )
            label = name or Path(path).name
        else:
            from neox_l2e.analysis.lm_adapter import NeoXL2ELM
            from neox_l2e.analysis.loading import load_model

            loaded = load_model(path, device=device, dtype=dtype, tokenizer=args.tokenizer, tag=args.tag, name=name)
            lm = NeoXL2ELM(loaded.model, loaded.tokenizer, batch_size=args.batch_size, max_length=args.max_length)
            label = loaded.name
        lm = build_lm(lm, args.batch_size, str(device))
        for k in shots:
            t0 = time.time()
            res = evaluate(
                lm,
                tasks,
                num_fewshot=k,
                data_dir=args.data_dir,
                files=files,
                limit=limit,
                batch_size=args.batch_size,
                device=str(device),
                bootstrap_iters=args.bootstrap_iters,
                seed=args.seed,
                extra_tasks=extra_tasks,
                include_paths=args.include_path,
                log_samples=args.log_samples,
            )
            res.update(model=label, checkpoint=str(path), backend=backend, seconds=round(time.time() - t0, 2))
            for line in truncation_warnings(res, label):
                print(line, file=sys.stderr)
            samples = res.pop("samples", None)
            if samples is not None:
                sample_dir = Path(args.out).with_suffix(".samples")
                for task, rows in samples.items():
                    f = sample_dir / f"{label}.{k}shot.{Path(task).name}.jsonl"
                    write_jsonl_records(rows, f)
                res["samples_dir"] = str(sample_dir)
            runs.append(res)
    out = Path(args.out)
    write_json({"runs": runs}, out.with_suffix(".json"))
    lines = results_table(runs)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
