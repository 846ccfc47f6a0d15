"""tools/prepare_eval_data.py: the public layouts of the paper's tasks -> the local task jsonl (tiny files)."""

import csv
import json

import pytest
from analysis_helpers import run_tool

from neox_l2e.analysis.common import AnalysisError
from neox_l2e.analysis.eval_data import convert
from neox_l2e.analysis.evaluation import TASKS, _check_jsonl

ARC_HF = {
    "id": "Mercury_1",
    "question": "Which is a mammal?",
    "choices": {"text": ["trout", "whale", "shark", "eel"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
ARC_ORIGINAL = {
    "id": "Mercury_1",
    "answerKey": "B",
    "question": {
        "stem": "Which is a mammal?",
        "choices": [
            {"text": "trout", "label": "A"},
            {"text": "whale", "label": "B"},
            {"text": "shark", "label": "C"},
            {"text": "eel", "label": "D"},
        ],
    },
}
MMLU_HF = {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arc_layouts(tmp_path):
    a = convert("arc_easy", [_jsonl(tmp_path / "hf.jsonl", [ARC_HF])])
    b = convert("arc_easy", [_jsonl(tmp_path / "orig.jsonl", [ARC_ORIGINAL])])
    assert a == b == [ARC_HF]
    with pytest.raises(AnalysisError, match=r"orig2.jsonl:1: answerKey 'E' is not one of the labels"):
        convert("arc_challenge", [_jsonl(tmp_path / "orig2.jsonl", [dict(ARC_ORIGINAL, answerKey="E")])])


def test_parquet_and_json_layouts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ARC_HF, dict(ARC_HF, id="x", answerKey="D")]), str(tmp_path / "t.parquet"))
    rows = convert("arc_challenge", [tmp_path / "t.parquet"])
    assert rows[0] == ARC_HF and rows[1]["answerKey"] == "D"
    pq.write_table(pa.Table.from_pylist([MMLU_HF]), str(tmp_path / "m.parquet"))
    assert convert("mmlu", [tmp_path / "m.parquet"]) == [MMLU_HF]
    sciq = {
        "question": "What do plants make?",
        "distractor3": "oil",
        "distractor1": "salt",
        "distractor2": "iron",
        "correct_answer": "sugar",
        "support": None,
    }
    (tmp_path / "sciq.json").write_text(json.dumps([sciq]))  # the SciQ release: one JSON list
    (s,) = convert("sciq", [tmp_path / "sciq.json"])
    assert s["correct_answer"] == "sugar" and s["support"] == ""


def test_mmlu_csv_folder(tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    for subject, rows in (
        ("abstract_algebra", [["Q1?", "a", "b", "c", "d", "C"]]),
        ("virology", [["Q2?", "w", "x", "y", "z", "A"], ["Q3?", "1", "2", "3", "4", "D"]]),
    ):
        with open(d / f"{subject}_test.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    rows = convert("mmlu", [d])
    assert [(r["subject"], r["answer"], r["choices"][0]) for r in rows] == [
        ("abstract_algebra", 2, "a"),
        ("virology", 0, "w"),
        ("virology", 3, "1"),
    ]


def test_piqa_labels_and_lambada_text(tmp_path):
    rows = [
        {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid"},
        {"goal": "Dry hands", "sol1": "Use water", "sol2": "Use a towel"},
    ]
    valid = _jsonl(tmp_path / "valid.jsonl", rows)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    out = convert("piqa", [valid], labels=tmp_path / "valid-labels.lst")
    assert [r["label"] for r in out] == [0, 1]
    with pytest.raises(AnalysisError, match="--labels"):
        convert("piqa", [valid])
    (tmp_path / "lambada.txt").write_text("She opened the door and saw the garden\n\nHe went out into the rain\n")
    assert convert("lambada", [tmp_path / "lambada.txt"]) == [
        {"text": "She opened the door and saw the garden"},
        {"text": "He went out into the rain"},
    ]


def test_tool_writes_task_files_evaluate_reads(tmp_path, tiny_neox_ckpt):
    src = _jsonl(tmp_path / "ARC-Easy-Test.jsonl", [ARC_ORIGINAL, dict(ARC_ORIGINAL, id="2", answerKey="A")])
    train = _jsonl(tmp_path / "ARC-Easy-Train.jsonl", [ARC_ORIGINAL])
    out = tmp_path / "eval"
    r = run_tool("prepare_eval_data.py", "arc_easy", src, "--fewshot", train, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "arc_easy.jsonl (2 examples)" in r.stdout and "arc_easy.fewshot.jsonl (1 examples)" in r.stdout
    assert _check_jsonl(out / "arc_easy.jsonl", TASKS["arc_easy"][2]) == 2
    from neox_l2e.analysis.evaluation import evaluate
    from neox_l2e.analysis.lm_adapter import NeoXL2ELM

    res = evaluate(
        NeoXL2ELM.from_checkpoint(tiny_neox_ckpt[0], device="cpu"), ["arc_easy"], num_fewshot=1, data_dir=out
    )
    assert res["info"]["arc_easy"]["fewshot"] and 0.0 <= res["results"]["arc_easy"]["acc"] <= 1.0
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    r = run_tool("prepare_eval_data.py", "sciq", bad, "--out-dir", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.jsonl:1: missing field(s)" in r.stderr


def test_chance_accuracy(tmp_path):
    from neox_l2e.analysis.evaluation import chance_accuracy

    three = dict(ARC_HF, choices={"text": ["a", "b", "c"], "label": ["A", "B", "C"]})
    f = _jsonl(tmp_path / "arc.jsonl", [three, ARC_HF, ARC_HF, ARC_HF])
    assert chance_accuracy("arc_easy", f) == pytest.approx((1 / 3 + 3 / 4) / 4)
    assert chance_accuracy("arc_easy", f, limit=1) == pytest.approx(1 / 3)
    assert chance_accuracy("arc_easy", f, limit=0.5) == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert chance_accuracy("piqa", f) == 0.5 and chance_accuracy("lambada", f) is None
