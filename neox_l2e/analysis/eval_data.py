"""Turning the public files of the paper's tasks into the local task format of ``evaluation.TASKS`` (offline).

Readers: ``.jsonl``; ``.json`` (a list of rows, or ``{"data": [...]}``, or one object a line); ``.parquet`` (the
Hugging Face dataset files; needs pyarrow); ``.csv`` (MMLU's original layout: no header, question, A, B, C,
D, answer letter; the subject from the file name ``<subject>_test.csv``); ``.txt`` (LAMBADA's plain text: one
passage a line); a folder: its files of those kinds, sorted. Per task the converters accept the usual layouts:

- arc_easy / arc_challenge: ai2_arc rows (``question``, ``choices`` = {text, label}, ``answerKey``) or the
  original ARC jsonl (``question`` = {stem, choices: [{text, label}]}, ``answerKey``);
- mmlu: cais/mmlu rows (``question``, ``subject``, ``choices``, ``answer`` 0-3 or a letter) or the original
  csv files;
- piqa: rows with ``goal``, ``sol1``, ``sol2``, ``label``, or the original ``valid.jsonl`` without labels plus
  ``valid-labels.lst`` (one 0/1 a line, ``labels=``);
- sciq: the SciQ rows (``question``, ``distractor1-3``, ``correct_answer``, ``support``);
- lambada: rows with ``text`` (lambada_openai) or the plain text file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from .common import AnalysisError

READABLE = (".jsonl", ".json", ".parquet", ".csv", ".txt")
LETTERS = "ABCDEFGHIJ"


def _files(path) -> List[Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in READABLE)
        if not found:
            raise AnalysisError(f"{p}: no {', '.join(READABLE)} files in this folder")
        return found
    if not p.is_file():
        raise AnalysisError(f"{p}: not found")
    if p.suffix not in READABLE:
        raise AnalysisError(f"{p}: unknown file kind (expected one of {', '.join(READABLE)})")
    return [p]


def _plain(v):
    """numpy arrays / scalars from parquet -> lists / Python scalars."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_rows(path) -> List[dict]:
    """The rows of a file or folder (see the module docstring), each tagged with ``_source`` ("file:line")."""
    rows: List[dict] = []
    for f in _files(path):
        rows += _read_file(f)
    return rows


def _read_file(f: Path) -> List[dict]:
    if f.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise AnalysisError(f"{f}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(str(f)).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's own error types
            raise AnalysisError(f"{f}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
        return [dict(_plain(r), _source=f"{f}:{i + 1}") for i, r in enumerate(table)]
    if f.suffix == ".csv":
        with open(f, encoding="utf-8", newline="") as fh:
            out = []
            for i, r in enumerate(csv.reader(fh), 1):
                if len(r) != 6:
                    raise AnalysisError(f"{f}:{i}: expected 6 columns (question, A, B, C, D, answer), got {len(r)}")
                out.append({"_csv": r, "_file": f.stem, "_source": f"{f}:{i}"})
            return out
    text = f.read_text(encoding="utf-8")
    if f.suffix == ".txt":
        return [
            {"text": line.strip(), "_source": f"{f}:{i}"} for i, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    if f.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # one object a line under a .json name: read as jsonl
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if isinstance(obj, list):
            if not all(isinstance(r, dict) for r in obj):
                raise AnalysisError(f"{f}: expected a list of objects")
            return [dict(r, _source=f"{f}:{i + 1}") for i, r in enumerate(obj)]
        if isinstance(obj, dict):
            return [dict(obj, _source=f"{f}:1")]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{f}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise AnalysisError(f"{f}:{i}: expected a JSON object")
        rows.append(dict(r, _source=f"{f}:{i}"))
    return rows


def _need(row: dict, *keys):
    missing = [k for k in keys if k not in row]
    if missing:
        have = ", ".join(k for k in row if not k.startswith("_"))
        raise AnalysisError(f"{row['_source']}: missing field(s) {', '.join(missing)} (the row has: {have})")
    return [row[k] for k in keys]


def arc(row: dict) -> dict:
    q = row.get("question")
    if isinstance(q, dict):  # the original ARC jsonl
        stem, choices = _need(q | {"_source": row["_source"]}, "stem", "choices")
        text, label = [c["text"] for c in choices], [str(c["label"]) for c in choices]
        question = stem
    else:
        question, ch = _need(row, "question", "choices")
        if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
            raise AnalysisError(f'{row["_source"]}: \'choices\' should be {{"text": [...], "label": [...]}}')
        text, label = list(ch["text"]), [str(x) for x in ch["label"]]
    (key,) = _need(row, "answerKey")
    key = str(key)
    if key not in label:
        raise AnalysisError(f"{row['_source']}: answerKey {key!r} is not one of the labels {label}")
    return {
        "id": str(row.get("id", "")),
        "question": question,
        "choices": {"text": text, "label": label},
        "answerKey": key,
    }


def _answer_index(value, n: int, source: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    try:
        i = int(value)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < n:
        raise AnalysisError(f"{source}: answer {value!r} is not an index 0-{n - 1} or a letter A-{LETTERS[n - 1]}")
    return i


def _subject_of(stem: str) -> str:
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def mmlu(row: dict) -> dict:
    if "_csv" in row:  # the original csv files
        q, a, b, c, d, ans = row["_csv"]
        choices, subject = [a, b, c, d], _subject_of(row["_file"])
    else:
        q, choices, ans = _need(row, "question", "choices", "answer")
        subject = row.get("subject") or ""
        if not subject:
            raise AnalysisError(f"{row['_source']}: missing field 'subject' (the prompt names it)")
        choices = list(choices)
    if len(choices) != 4:
        raise AnalysisError(f"{row['_source']}: MMLU has 4 choices, this row {len(choices)}")
    return {
        "question": q,
        "subject": subject,
        "choices": [str(c) for c in choices],
        "answer": _answer_index(ans, 4, row["_source"]),
    }


def piqa(row: dict) -> dict:
    goal, sol1, sol2 = _need(row, "goal", "sol1", "sol2")
    if "label" not in row:
        raise AnalysisError(
            f"{row['_source']}: no 'label' (the original valid.jsonl: pass its labels file, "
            "valid-labels.lst, with --labels)"
        )
    return {"goal": goal, "sol1": sol1, "sol2": sol2, "label": _answer_index(row["label"], 2, row["_source"])}


def sciq(row: dict) -> dict:
    q, d1, d2, d3, ans = _need(row, "question", "distractor1", "distractor2", "distractor3", "correct_answer")
    return {
        "question": q,
        "distractor1": d1,
        "distractor2": d2,
        "distractor3": d3,
        "correct_answer": ans,
        "support": row.get("support") or "",
    }


def lambada(row: dict) -> dict:
    (text,) = _need(row, "text")
    text = str(text).strip()
    if " " not in text:
        raise AnalysisError(f"{row['_source']}: a LAMBADA passage needs a context before its last word")
    return {"text": text}


CONVERTERS: Dict[str, Callable[[dict], dict]] = {
    "arc_easy": arc,
    "arc_challenge": arc,
    "mmlu": mmlu,
    "piqa": piqa,
    "sciq": sciq,
    "lambada": lambada,
}


def read_labels(path) -> List[int]:
    """PIQA's labels file: one 0/1 a line."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"{p}: labels file not found")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            if line.strip() not in ("0", "1"):
                raise AnalysisError(f"{p}:{i}: expected 0 or 1, got {line.strip()!r}")
            out.append(int(line))
    return out


def convert(task: str, inputs: Sequence, labels: Optional[str] = None) -> List[dict]:
    """The rows of ``inputs`` (files or folders) in the local format of ``task``."""
    if task not in CONVERTERS:
        raise AnalysisError(f"no converter for task {task!r} (tasks: {', '.join(CONVERTERS)})")
    rows: List[dict] = []
    for path in inputs:
        rows += read_rows(path)
    if labels is not None:
        lab = read_labels(labels)
        if len(lab) != len(rows):
            raise AnalysisError(f"{labels}: {len(lab)} labels for {len(rows)} rows")
        rows = [dict(r, label=v) for r, v in zip(rows, lab)]
    if not rows:
        raise AnalysisError(f"{', '.join(map(str, inputs))}: no rows")
    return [CONVERTERS[task](r) for r in rows]


def write_rows(rows: Iterable[dict], path) -> Path:
    """jsonl, written under a temporary name and renamed (no half-written task file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p
