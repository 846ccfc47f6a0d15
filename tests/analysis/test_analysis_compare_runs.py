"""tools/compare_runs.py on synthetic runs in both metrics.jsonl styles."""

import json
import math

import pytest
from analysis_helpers import png_has_content, run_tool

from neox_l2e.analysis.common import AnalysisError
from neox_l2e.analysis.runs import layer_mean, read_run, summary_table


def _write_runs(root):
    base, l2e = root / "baseline", root / "l2e"
    base.mkdir()
    (l2e / "logs").mkdir(parents=True)
    with open(base / "metrics.jsonl", "w") as f:  # the brief's style: step / loss / lr / valid/loss
        for s in range(1, 101):
            rec = {"step": s, "loss": 6 * math.exp(-s / 40) + 2.0, "lr": 1e-3}
            if s % 25 == 0:
                rec["valid/loss"] = 6 * math.exp(-s / 40) + 2.3
            f.write(json.dumps(rec) + "\n")
    with open(l2e / "logs" / "metrics.jsonl", "w") as f:  # the trainer's style: kind / iteration / lm_loss
        f.write(json.dumps({"kind": "run", "iteration": 0, "parameters": 123}) + "\n")
        for s in range(1, 101):
            rec = {
                "kind": "train",
                "iteration": s,
                "lm_loss": 6 * math.exp(-s / 40) + 1.9,
                "lr": 1e-3,
                "l2e/layer1/frac_selected": 0.02,
                "l2e/layer2/frac_selected": 0.04,
                "l2e/layer1/frac_phi_gt_5": 0.05,
                "l2e/layer2/frac_phi_gt_5": float("nan"),
            }
            f.write(json.dumps(rec) + "\n")
            if s % 50 == 0:
                f.write(json.dumps({"kind": "valid", "iteration": s, "lm_loss": 2.5 - s / 1000}) + "\n")
        f.write('{"kind": "train", "iterat')  # a line being written while we read
    (root / "eval_l2e.json").write_text(
        json.dumps(
            {"runs": [{"model": "l2e", "num_fewshot": 0, "results": {"arc_easy": {"acc": 0.41, "acc_norm": 0.39}}}]}
        )
    )
    (base / "eval.json").write_text(
        json.dumps(
            {
                "runs": [
                    {"model": "baseline", "num_fewshot": 0, "results": {"arc_easy": {"acc": 0.40, "acc_norm": 0.37}}}
                ]
            }
        )
    )
    return base, l2e


def test_read_both_styles(tmp_path):
    base, l2e = _write_runs(tmp_path)
    a, b = read_run(base), read_run(l2e)
    assert len(a.train_loss[0]) == 100 and len(a.valid_loss[0]) == 4 and a.evals
    assert len(b.train_loss[0]) == 100 and b.valid_loss[1] == [2.45, 2.4] and b.skipped_lines == 1
    steps, vals = layer_mean(b, "frac_selected")
    assert len(steps) == 100 and vals[0] == pytest.approx(0.03)
    assert layer_mean(b, "frac_phi_gt_5")[1][0] == pytest.approx(0.05)  # NaN values are dropped
    table = summary_table([a, b])
    assert table[2].startswith("| baseline | 100 |") and "0.0300" in table[3]


def test_compare_tool(tmp_path):
    base, l2e = _write_runs(tmp_path)
    out = tmp_path / "cmp"
    r = run_tool(
        "compare_runs.py", f"base={base}", f"l2e={l2e}", "--eval", f"l2e={tmp_path / 'eval_l2e.json'}", "--out", out
    )
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.with_suffix(".md").read_text()
    assert "arc_easy acc_norm (0-shot)" in md and "| base |" in md and "| l2e |" in md
    assert "0.3900" in md and "0.3700" in md
    png_has_content(out.with_suffix(".png"))


def test_no_loss_records_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(AnalysisError, match="no loss records"):
        read_run(tmp_path)


def _two_model_eval(path):
    """tools/evaluate.py output for two models (one file, as the docs' two-model command writes it)."""
    recs = []
    for model, score in (("base", 1 / 3), ("l2e", 0.3167)):
        for shots in (0, 5):
            recs.append(
                {
                    "model": model,
                    "num_fewshot": shots,
                    "checkpoint": f"runs/{model}/checkpoints",
                    "results": {
                        "tiny_shakespeare": {
                            "acc": score + shots / 100,
                            "acc_norm": score + shots / 100,
                            "acc_norm_stderr": 0.05,
                        }
                    },
                }
            )
    path.write_text(json.dumps({"runs": recs}))
    return path


def test_eval_file_of_two_models_gives_each_run_its_own(tmp_path):
    base, l2e = _write_runs(tmp_path)
    (base / "eval.json").unlink()
    both = _two_model_eval(tmp_path / "base_vs_l2e.json")
    out = tmp_path / "cmp"
    r = run_tool(
        "compare_runs.py", f"base={base}", f"l2e={l2e}", "--eval", f"base={both}", "--eval", f"l2e={both}", "--out", out
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in out.with_suffix(".md").read_text().splitlines()[2:]}
    assert "0.3333" in rows["base"] and "0.3833" in rows["base"] and "0.3167" not in rows["base"]
    assert "0.3167" in rows["l2e"] and "0.3667" in rows["l2e"] and "0.3333" not in rows["l2e"]


def test_eval_file_without_the_runs_model_is_one_line(tmp_path):
    base, _ = _write_runs(tmp_path)
    both = _two_model_eval(tmp_path / "base_vs_l2e.json")
    r = run_tool("compare_runs.py", f"memel={base}", "--eval", f"memel={both}", "--out", tmp_path / "cmp")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "none named 'memel'" in err[0] and "base, l2e" in err[0], r.stderr


def test_eval_in_run_folder_matched_by_model(tmp_path):
    base, _ = _write_runs(tmp_path)
    _two_model_eval(base / "eval.json")
    from neox_l2e.analysis.runs import eval_scores

    assert eval_scores(read_run(base, "l2e"))["tiny_shakespeare acc_norm (0-shot)"] == pytest.approx(0.3167)
    assert eval_scores(read_run(base, "base"))["tiny_shakespeare acc_norm (0-shot)"] == pytest.approx(1 / 3)
    with pytest.raises(AnalysisError, match="none named 'baseline'"):
        read_run(base)


def test_new_metric_names(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 5):
            f.write(
                json.dumps(
                    {
                        "kind": "train",
                        "iteration": s,
                        "lm_loss": 3.0,
                        "l2e_train/layer0/frac_selected": 0.01,
                        "ms_heldout/layer0/frac_phi_gt_5": 0.002,
                        "l2e/layer1/frac_selected": 0.03,
                    }
                )
                + "\n"
            )
    run = read_run(tmp_path)
    assert layer_mean(run, "frac_selected")[1] == [pytest.approx(0.02)] * 4
    assert layer_mean(run, "heldout/frac_phi_gt_5")[1] == [pytest.approx(0.002)] * 4


def test_small_fractions_keep_their_digits():
    from neox_l2e.analysis.runs import fmt

    assert fmt(0.000126) == "0.000126" and fmt(1.5e-5) == "1.50e-05" and fmt(0.03) == "0.0300"
    assert fmt(2.55261) == "2.5526" and fmt(0.0) == "0.0000" and fmt(None) == "-"


def test_compare_figure_tells_runs_apart(tmp_path):
    """Log-scale L2E panels, no learning-rate panel, eval bars with lm-eval's stderr and a chance line; the
    table keeps small fractions' digits and shows the stderr."""
    from matplotlib.container import ErrorbarContainer

    from neox_l2e.analysis.runs import eval_entries, runs_figure

    base, l2e = _write_runs(tmp_path)
    with open(l2e / "logs" / "metrics.jsonl", "a") as f:
        f.write(
            "\n"
            + json.dumps(
                {"kind": "train", "iteration": 101, "lm_loss": 2.0, "ms_heldout/layer1/frac_phi_gt_5": 1.26e-4}
            )
            + "\n"
        )
    both = _two_model_eval(tmp_path / "both.json")
    a, b = read_run(base, "base"), read_run(l2e, "l2e")
    from neox_l2e.analysis.runs import read_eval_file, select_evals

    a.evals, b.evals = (select_evals(read_eval_file(both), n, both) for n in ("base", "l2e"))
    for r in (a, b):
        r.evals[0]["chance"] = {"tiny_shakespeare": 0.25}
    assert eval_entries(b)["tiny_shakespeare acc_norm (0-shot)"] == (0.3167, 0.05, 0.25)
    assert eval_entries(b)["tiny_shakespeare acc_norm (5-shot)"][2] is None  # no chance recorded there
    fig = runs_figure([a, b], ("frac_selected", "heldout/frac_phi_gt_5"))
    titles = [ax.get_title() for ax in fig.axes]
    assert not any("earning rate" in t for t in titles)
    l2e_axes = [ax for ax in fig.axes if ax.get_title().startswith("L2E metrics")]
    assert len(l2e_axes) == 2 and all(ax.get_yscale() == "log" for ax in l2e_axes)
    ev = next(ax for ax in fig.axes if ax.get_title() == "Evaluation")
    assert sum(isinstance(c, ErrorbarContainer) for c in ev.containers) == 2
    assert "chance" in [t.get_text() for t in ev.get_legend().get_texts()]
    table = "\n".join(summary_table([a, b], ("heldout/frac_phi_gt_5",)))
    assert "0.000126" in table and "0.3167 ± 0.0500" in table
