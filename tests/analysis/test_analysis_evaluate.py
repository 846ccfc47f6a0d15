"""lm-eval offline: the adapter's numbers, the task yamls, the tool end to end."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from analysis_helpers import run_tool

from neox_l2e.analysis.common import load_tokenizer
from neox_l2e.analysis.evaluation import TASKS, evaluate
from neox_l2e.analysis.lm_adapter import NeoXL2ELM
from neox_l2e.analysis.loading import load_model


@pytest.fixture(scope="module")
def adapter(tiny_neox_ckpt):
    ckpt, _ = tiny_neox_ckpt
    loaded = load_model(ckpt)
    return NeoXL2ELM(loaded.model, loaded.tokenizer, batch_size=3)


def _req(*args):
    return SimpleNamespace(args=args)


def _direct_logprob(model, ids, start, vocab):
    """sum over positions >= start of log p(ids[t] | ids[:t]), straight from the model; the softmax runs over the
    tokenizer's vocabulary (padding rows of the embedding are out, as in training)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, :, :vocab].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_loglikelihood_matches_direct_computation(adapter):
    tok, model = adapter.tok, adapter.model
    reqs = [
        _req("To be, or not to be:", " that is the question"),
        _req("def f(x):", "\n    return x"),
        _req("", "hello world"),
        _req("a" * 300, " tail"),
    ]  # the last one exceeds the 128-token window
    got = adapter.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip([r.args for r in reqs], got):
        c, k = adapter._encode_pair(ctx, cont)
        ids = ((c or [tok.eod]) + k)[-129:]
        ref = _direct_logprob(model, ids, len(ids) - len(k), tok.vocab_size)
        assert ll == pytest.approx(ref, abs=1e-4) and ll < 0 and isinstance(greedy, bool)
    # trailing spaces of the context go to the continuation, as in the harness's HF model
    assert adapter._encode_pair("Answer: ", "yes") == adapter._encode_pair("Answer:", " yes")


def test_rolling_and_generation(adapter):
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;" * 3
    (roll,) = adapter.loglikelihood_rolling([_req(text)])
    ids = adapter.tok.encode(text)
    assert len(ids) > 128  # several windows: each token scored once
    per_window = []
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, adapter.tok.eod, 128, 1)):
        full = ctx + pred
        per_window.append(_direct_logprob(adapter.model, full, len(ctx), adapter.tok.vocab_size))
    assert roll == pytest.approx(sum(per_window), abs=1e-3) and roll < 0
    short = "Now is the winter"
    ids = adapter.tok.encode(short)
    (r1,) = adapter.loglikelihood_rolling([_req(short)])
    assert r1 == pytest.approx(
        _direct_logprob(adapter.model, [adapter.tok.eod] + ids, 1, adapter.tok.vocab_size), abs=1e-4
    )
    (out,) = adapter.generate_until([_req("Now is the", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(out, str) and "\n" not in out


def test_hf_backend_agrees_with_adapter(tmp_path, tiny_hf_dir):
    """The same HF folder (as our exporter writes it: tokenizer.json + tokenizer_config.json, nothing added
    by hand) through lm-eval's own hf model and through our adapter: same scores."""
    hf = Path(tiny_hf_dir)
    assert (hf / "tokenizer_config.json").is_file()
    data = tmp_path / "data"
    from neox_l2e.analysis.evaluation import build_tiny_shakespeare

    build_tiny_shakespeare(data / "tiny_shakespeare.jsonl", n=12, seed=3)
    loaded = load_model(hf)
    ours = evaluate(NeoXL2ELM(loaded.model, loaded.tokenizer), ["tiny_shakespeare"], data_dir=data)
    theirs = evaluate(
        ("hf", {"pretrained": str(hf), "dtype": "float32"}), ["tiny_shakespeare"], data_dir=data, device="cpu"
    )
    a, b = ours["results"]["tiny_shakespeare"], theirs["results"]["tiny_shakespeare"]
    assert a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]


def _synthetic_task_files(d):
    arc = {
        "id": "q1",
        "question": "Which is a mammal?",
        "choices": {"text": ["trout", "whale", "shark"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    rows = {
        "arc_easy": [arc, dict(arc, id="q2", answerKey="A")],
        "arc_challenge": [arc, dict(arc, id="q3", answerKey="C")],
        "sciq": [
            {
                "question": "What do plants make?",
                "distractor1": "salt",
                "distractor2": "iron",
                "distractor3": "oil",
                "correct_answer": "sugar",
                "support": "Plants photosynthesize.",
            },
            {
                "question": "Water boils at?",
                "distractor1": "50 C",
                "distractor2": "10 C",
                "distractor3": "0 C",
                "correct_answer": "100 C",
                "support": "",
            },
        ],
        "mmlu": [
            {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "3 x 3 =", "subject": "elementary_mathematics", "choices": ["9", "6", "3", "1"], "answer": 0},
        ],
        "piqa": [
            {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid", "label": 0},
            {"goal": "Dry hands", "sol1": "Use water", "sol2": "Use a towel", "label": 1},
        ],
        "lambada": [
            {"text": "She opened the door and looked at the garden"},
            {"text": "He took his coat and went out into the rain"},
        ],
    }
    for name, rs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (d / "mmlu.fewshot.jsonl").write_text(json.dumps(rows["mmlu"][0]) + "\n")
    return list(rows)


def test_every_paper_task_yaml_runs(tmp_path, adapter):
    names = _synthetic_task_files(tmp_path)
    res = evaluate(adapter, names, num_fewshot=1, data_dir=tmp_path)
    assert set(res["results"]) == set(names)
    for t in names:
        assert 0.0 <= res["results"][t]["acc"] <= 1.0, t
    assert res["results"]["lambada"]["perplexity"] > 1.0
    assert res["info"]["mmlu"]["fewshot"] is not None and res["info"]["sciq"]["fewshot"] is None
    assert set(TASKS) == set(names) | {"tiny_shakespeare"}


def test_few_shot_changes_the_prompt(tmp_path, adapter):
    seen = {}

    class Recording(NeoXL2ELM):
        def loglikelihood(self, requests, disable_tqdm=False):
            seen.setdefault(self.shots, []).extend(r.args[0] for r in requests)
            return super().loglikelihood(requests)

    rec = Recording(adapter.model, adapter.tok)
    from neox_l2e.analysis.evaluation import build_tiny_shakespeare

    build_tiny_shakespeare(tmp_path / "tiny_shakespeare.jsonl", n=6, seed=1)
    for k in (0, 2):
        rec.shots = k
        evaluate(rec, ["tiny_shakespeare"], num_fewshot=k, data_dir=tmp_path)
    zero, two = seen[0], seen[2]
    assert len(zero) == len(two) == 6 * 4
    assert all(len(b) > len(a) for a, b in zip(sorted(zero), sorted(two)))


def test_evaluate_tool_end_to_end(tmp_path, tiny_neox_ckpt):
    ckpt, _ = tiny_neox_ckpt
    out = tmp_path / "eval" / "res"
    r = run_tool(
        "evaluate.py",
        f"mine={ckpt}",
        "--tasks",
        "tiny_shakespeare",
        "--shots",
        "0,1",
        "--limit",
        8,
        "--data-dir",
        tmp_path / "data",
        "--tiny-size",
        20,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "data" / "tiny_shakespeare.jsonl").is_file()
    rep = json.loads(out.with_suffix(".json").read_text())
    assert [(x["model"], x["num_fewshot"], x["backend"]) for x in rep["runs"]] == [
        ("mine", 0, "adapter"),
        ("mine", 1, "adapter"),
    ]
    for x in rep["runs"]:
        assert 0.0 <= x["results"]["tiny_shakespeare"]["acc"] <= 1.0
        assert x["n_samples"]["tiny_shakespeare"]["effective"] == 8
    assert "| mine | tiny_shakespeare | 1 |" in r.stdout and out.with_suffix(".md").is_file()


def test_tokenizer_loading_errors(tmp_path):
    from neox_l2e.analysis.common import AnalysisError

    with pytest.raises(AnalysisError, match="not found"):
        load_tokenizer(tmp_path / "none.model")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(AnalysisError, match="cannot load"):
        load_tokenizer(tmp_path / "junk.json")


def test_sentencepiece_checkpoint(tmp_path, labelled_jsonl):
    """Our checkpoint naming a SentencePiece model (the default corpus's tokenizer type): the adapter loads it
    through the checkpoint's config and scores with it."""
    import sentencepiece as spm
    from analysis_helpers import tiny_cfg

    from neox_l2e.checkpoint import write_weights_checkpoint
    from neox_l2e.model import GPTNeoX

    texts = [json.loads(l)["text"] for l in open(labelled_jsonl)]
    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "spm"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        eos_id=1,
        unk_id=0,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    cfg = tiny_cfg(vocab=400, seq=128, tokenizer_type="SPMTokenizer", vocab_file=str(tmp_path / "spm.model"))
    torch.manual_seed(2)
    model = GPTNeoX(cfg).eval()
    write_weights_checkpoint(tmp_path / "ckpt", cfg, [model.state_dict()], tag="global_step1")
    lm = NeoXL2ELM.from_checkpoint(tmp_path / "ckpt", device="cpu")
    assert lm.tok.eod == 1 and lm.tok.vocab_size == 400
    ((ll, _),) = lm.loglikelihood([_req("Shall I compare thee", " to a summer's day?")])
    c, k = lm._encode_pair("Shall I compare thee", " to a summer's day?")
    assert ll == pytest.approx(_direct_logprob(model, c + k, len(c), 400), abs=1e-4)


def test_truncated_few_shot_prompts_are_counted(tmp_path, adapter):
    """On the 128-token tiny model (a near character-level tokenizer) the count equals the samples whose
    requests the adapter really cuts (checked on the token ids it scores): some at 0-shot, all at 5-shot."""
    from neox_l2e.analysis.evaluation import build_tiny_shakespeare, truncation_warnings

    cut_contexts = set()

    class Recording(NeoXL2ELM):
        def loglikelihood(self, requests, disable_tqdm=False):
            for r in requests:
                c, k = self._encode_pair(*r.args)
                if len(c) + len(k) > self.max_length + 1:
                    cut_contexts.add(r.args[0])
            return super().loglikelihood(requests)

    rec = Recording(adapter.model, adapter.tok, batch_size=8)
    build_tiny_shakespeare(tmp_path / "tiny_shakespeare.jsonl", n=10, seed=1)
    counts = {}
    for k in (0, 5):
        res = evaluate(rec, ["tiny_shakespeare"], num_fewshot=k, data_dir=tmp_path, log_samples=True)
        rows = res["samples"]["tiny_shakespeare"]
        expected = sum(any(a[0] in cut_contexts for a in row["arguments"]) for row in rows)
        t = res["truncated"]["tiny_shakespeare"]
        assert t["truncated"] == expected and t["samples"] == 10 and t["max_length"] == 128
        counts[k] = expected
        if expected:
            (line,) = truncation_warnings(res, "m")
            assert f"{expected} of 10 prompts are longer than the model's context" in line and f"{k}-shot" in line
    assert counts[0] < 10 and counts[5] == 10
    assert "samples" not in evaluate(rec, ["tiny_shakespeare"], data_dir=tmp_path, limit=2)


def test_yaml_path_and_include_path_tasks(tmp_path, adapter):
    """A task YAML given by path and a task found through an include path run next to the local tasks."""
    import yaml

    from neox_l2e.analysis.common import AnalysisError
    from neox_l2e.analysis.evaluation import CONFIG_DIR, build_tiny_shakespeare, split_task_specs

    data = build_tiny_shakespeare(tmp_path / "tiny.jsonl", n=6, seed=2)
    cfg = yaml.safe_load((CONFIG_DIR / "tiny_shakespeare.yaml").read_text())
    inc = tmp_path / "mytasks"
    inc.mkdir()
    for name in ("my_tiny_a", "my_tiny_b"):
        c = dict(cfg, task=name, dataset_kwargs={"data_files": {"test": str(data)}})
        c.pop("fewshot_split", None)
        (inc / f"{name}.yaml").write_text(yaml.safe_dump(c))
    local, extra = split_task_specs(f"tiny_shakespeare,{inc / 'my_tiny_a.yaml'},my_tiny_b", [inc])
    assert local == ["tiny_shakespeare"] and extra[0]["task"] == "my_tiny_a" and extra[1] == "my_tiny_b"
    res = evaluate(
        adapter,
        local,
        data_dir=tmp_path / "none",
        files={"tiny_shakespeare": str(data)},
        extra_tasks=extra,
        include_paths=[inc],
    )
    r = res["results"]
    assert set(r) == {"tiny_shakespeare", "my_tiny_a", "my_tiny_b"}
    assert r["my_tiny_a"]["acc"] == r["my_tiny_b"]["acc"] == r["tiny_shakespeare"]["acc"]
    with pytest.raises(AnalysisError, match="unknown task.*nope"):
        split_task_specs("nope", [inc])
    with pytest.raises(AnalysisError, match="task YAML not found"):
        split_task_specs(str(tmp_path / "missing.yaml"))


def test_evaluate_tool_log_samples_and_include_path(tmp_path, tiny_neox_ckpt):
    ckpt, _ = tiny_neox_ckpt
    out = tmp_path / "res"
    r = run_tool(
        "evaluate.py",
        f"mine={ckpt}",
        "--tasks",
        "tiny_shakespeare",
        "--shots",
        "0,5",
        "--limit",
        6,
        "--data-dir",
        tmp_path / "data",
        "--tiny-size",
        12,
        "--log_samples",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for k in (0, 5):
        rows = [json.loads(l) for l in open(tmp_path / "res.samples" / f"mine.{k}shot.tiny_shakespeare.jsonl")]
        assert len(rows) == 6 and all("arguments" in x and "acc" in x for x in rows)
    warn = [l for l in r.stderr.splitlines() if l.startswith("warning: mine, tiny_shakespeare, 5-shot: 6 of 6")]
    assert len(warn) == 1 and "few-shot examples are cut" in warn[0], r.stderr[-2000:]
    r = run_tool("evaluate.py", f"mine={ckpt}", "--tasks", "nope", "--include_path", tmp_path, "--out", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown task(s) nope" in r.stderr


def test_lm_eval_cli_with_the_neox_l2e_model(tmp_path, tiny_neox_ckpt):
    """`python -m neox_l2e.lm_eval --model neox_l2e ...`: lm-eval's own CLI, our model, a local task yaml; the
    score equals tools/evaluate.py's on the same examples."""
    import os
    import subprocess
    import sys

    import yaml
    from analysis_helpers import REPO

    from neox_l2e.analysis.evaluation import CONFIG_DIR, build_tiny_shakespeare

    ckpt, _ = tiny_neox_ckpt
    data = build_tiny_shakespeare(tmp_path / "tiny.jsonl", n=8, seed=4)
    inc = tmp_path / "tasks"
    inc.mkdir()
    cfg = yaml.safe_load((CONFIG_DIR / "tiny_shakespeare.yaml").read_text())
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data)}}
    cfg.pop("fewshot_split", None)
    (inc / "tiny_shakespeare.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "neox_l2e.lm_eval",
            "--model",
            "neox_l2e",
            "--model_args",
            f"checkpoint={ckpt},device=cpu",
            "--tasks",
            "local_tiny_shakespeare",
            "--include_path",
            str(inc),
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "local_tiny_shakespeare" in r.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1 and list((tmp_path / "out").rglob("samples_local_tiny_shakespeare_*.jsonl"))
    acc = json.loads(results[0].read_text())["results"]["local_tiny_shakespeare"]["acc,none"]
    ours = evaluate(
        NeoXL2ELM.from_checkpoint(ckpt, device="cpu"), ["tiny_shakespeare"], files={"tiny_shakespeare": str(data)}
    )
    assert acc == ours["results"]["tiny_shakespeare"]["acc"]
