"""Task quality (edgepack.tasks, protocol edgepack-task-v1): the metric definitions against their references, the
generation pipeline against an oracle runtime, option log-likelihood against an independent transformers computation,
the same numbers from an hf and an ONNX artifact, the eval stage and the lossy-stage gates in a recipe, the report
and `edgepack eval --task`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.artifact import open_artifact
from edgepack.errors import ConfigError, ValidationFailed
from edgepack.tasks import TaskProtocol, compare, evaluate_task, exact_match, load_items, option_loglik, token_f1

pytest.importorskip("rouge_score", reason="needs rouge-score (pip install 'edgepack[eval]')")
pytest.importorskip("sacrebleu", reason="needs sacrebleu (pip install 'edgepack[eval]')")

QUESTIONS = ["Tell me a story about a dog.", "What did the little girl find in the park?", "Who lives in the big tree?",
             "Write about a red ball.", "Why was Tim sad?", "Describe a sunny day at the beach.",
             "What is the name of the cat?", "Tell me about a brave bird.", "Where did the family go on Sunday?",
             "What did Lily want to eat?", "Write a story about a small boat.", "Who found the shiny key?"]


def _records(n: int) -> list[dict]:
    return [{"instruction": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i})", "input": "",
             "output": f"placeholder answer {i}"} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_squad_exact_match_and_f1():
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("a cat", "dog") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # p = 2/2, r = 2/3
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0
    assert token_f1("sat sat cat", "cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # multiset overlap


class OracleRuntime:
    """Generates a given answer for each prompt (one-hot logits), to test the pipeline around the model."""

    name = "oracle"

    def __init__(self, tok, answers: dict[tuple, list[int]]):
        self.tok, self.answers, self.pos, self.seq = tok, answers, 0, []

    def _onehot(self):
        z = np.full((1, len(self.tok)), -10.0, dtype=np.float32)
        z[0, self.seq[self.pos] if self.pos < len(self.seq) else self.tok.eos_token_id] = 10.0
        self.pos += 1
        return z

    def reset(self):
        self.pos, self.seq = 0, []

    def prefill(self, ids):
        self.seq, self.pos = self.answers[tuple(int(t) for t in ids[0])], 0
        return self._onehot()

    def decode_step(self, ids):
        return self._onehot()


def test_generation_metrics_through_an_oracle_runtime(stories, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    from edgepack.hf import load_tokenizer
    from edgepack.tune.data import prompt_and_reference

    tok = load_tokenizer(stories)
    task = _write(tmp_path / "t.jsonl", [{**r, "output": f"The dog ran to the park number {i}."}
                                         for i, r in enumerate(_records(10))])
    proto = TaskProtocol(split="all", max_samples=None, max_new_tokens=24)
    items, _ = load_items(task, proto)
    answers, wrong = {}, {}
    for i, rec in enumerate(items):
        prompt, ref = prompt_and_reference(rec, tok)
        key = tuple([tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"])
        answers[key] = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        wrong[key] = tok("The cat sat on the mat." if i % 2 else ref + " And more words", add_special_tokens=False)["input_ids"]
    art = open_artifact(stories)
    perfect = evaluate_task(art, task, proto, opened=(OracleRuntime(tok, answers), tok)).summary
    g = perfect["generation"]
    assert (g["exact_match"], g["f1"], g["rougeL"], g["bleu"]) == (100.0, 100.0, 100.0, 100.0)
    assert g["stopped_at_eos"] == 10 and perfect["metric"] == "rougeL" and perfect["score"] == 100.0
    res = evaluate_task(art, task, proto, opened=(OracleRuntime(tok, wrong), tok))
    preds = [o["prediction"] for o in res.outputs]
    refs = [o["reference"] for o in res.outputs]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = 100 * np.mean([scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(refs, preds)])
    g = res.summary["generation"]
    assert g["rougeL"] == pytest.approx(want, abs=1e-3) and 0 < g["rougeL"] < 100
    assert g["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-3)
    assert g["exact_match"] == 0.0 and g["stopped_at_eos"] < 10 and g["mean_new_tokens"] <= 24  # some ran to the limit
    assert g["rougeL_stderr"] == pytest.approx(np.std([o["rougeL"] for o in res.outputs], ddof=1) / math.sqrt(10), abs=1e-3)
    assert g["bleu_stderr"] > 0


def test_option_loglik_matches_an_independent_computation(stories):
    import torch

    from edgepack.deploy.runtime import open_runtime
    from edgepack.hf import load_model, load_tokenizer

    tok = load_tokenizer(stories)
    art = open_artifact(stories)
    rt = open_runtime(art)
    model = load_model(art, device="cpu")
    context, option = "Once upon a time, there was a little ", "girl named Lily."
    got = option_loglik(rt, tok, context, option, 512)
    # lm-evaluation-harness: the context's trailing space moves into the continuation
    ctx = [tok.bos_token_id] + tok(context.rstrip(), add_special_tokens=False)["input_ids"]
    whole = [tok.bos_token_id] + tok(context + option, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert got == pytest.approx(want, rel=1e-5) and got < 0


def test_choice_items_score_by_loglikelihood(stories, tmp_path):
    rows = [{"instruction": "Finish the story: Once upon a time, there was a little", "options": ["girl named Lily.",
             "xq zv kplm trb."], "answer": 0},
            {"instruction": "Finish: The sun was", "options": ["zzkq vvb", "shining and warm."], "answer": "B"},
            {"instruction": "Finish: Tom and his mom went to the", "options": ["park.", "qqxv jjz wkl."],
             "answer": "park."}]
    task = _write(tmp_path / "mc.jsonl", rows)
    res = evaluate_task(open_artifact(stories), task, TaskProtocol(split="all"))
    c = res.summary["choice"]
    assert c["n"] == 3 and c["acc"] == 100.0 and c["acc_norm"] == 100.0 and res.summary["metric"] == "acc"
    assert "generation" not in res.summary and len(res.outputs[0]["loglik"]) == 2
    assert res.summary["per_item"] == [100.0, 100.0, 100.0]


@pytest.mark.slow
def test_hf_and_onnx_artifacts_give_the_same_task_numbers(stories, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx

    task = _write(tmp_path / "t.jsonl", _records(6) + [
        {"instruction": "Finish: Once upon a time, there was a little", "options": ["girl.", "xq zv."], "answer": 0}])
    proto = TaskProtocol(split="all", max_new_tokens=16)
    hf = evaluate_task(open_artifact(stories), task, proto)
    onnx = export_onnx(open_artifact(stories), ExportConfig(exporter="torchscript", greedy_tokens=8), None,
                       tmp_path / "onnx")
    ox = evaluate_task(onnx, task, proto)
    assert ox.summary["protocol"]["runtime"] == "onnxruntime" and hf.summary["protocol"]["runtime"] == "torch-cpu"
    assert [o.get("prediction") for o in ox.outputs] == [o.get("prediction") for o in hf.outputs]
    assert ox.outputs[-1]["loglik"] == pytest.approx(hf.outputs[-1]["loglik"], abs=1e-3)
    assert ox.summary["generation"] == hf.summary["generation"]


@pytest.fixture(scope="module")
def self_task(stories, tmp_path_factory):
    """A task whose references are the base model's own greedy answers: the base scores 100, and anything that
    changes its greedy output scores less (a drop that cannot be noise)."""
    d = tmp_path_factory.mktemp("task")
    draft = _write(d / "draft.jsonl", _records(20))
    res = evaluate_task(open_artifact(stories), draft, TaskProtocol(split="all", max_samples=None))
    answers = {o["where"]: o["prediction"] for o in res.outputs}
    rows = [{**r, "output": answers[f"line {i + 1}"]} for i, r in enumerate(_records(20))]
    return _write(d / "self.jsonl", rows)


@pytest.mark.slow
def test_recipe_records_task_metrics_per_stage_gates_and_reports(stories, self_task, tmp_path):
    from edgepack.bench.recipe_report import build_report
    from edgepack.plan import load_recipe, run_recipe

    head = f"""[recipe]
name = "task"
model = "{stories}"
workdir = "wd"
[[stages]]
kind = "eval"
task = "{self_task}"
[[stages]]
kind = "prune"
method = "depth"
sparsity = 0.4
calib_tokens = 2048
eval_max_tokens = 512
task = "{self_task}"
max_task_drop = 100.0
"""
    (tmp_path / "r.toml").write_text(head)
    res = run_recipe(load_recipe(tmp_path / "r.toml"))
    ev, pr = res[0].metrics["task"], res[1].metrics["task"]
    assert ev["after"]["score"] > 90 and "before" not in ev  # the base answers itself (cleaning may touch spaces)
    assert ev["after"]["protocol"]["items"] >= 2 and ev["after"]["protocol"]["split"] == "test"
    assert pr["before_from"] == "the input's own record" and pr["before"] == ev["after"]
    assert pr["drop"] == pytest.approx(pr["before"]["score"] - pr["after"]["score"]) and pr["drop"] > 5
    assert pr["drop_stderr"] is not None
    rep = build_report(tmp_path / "wd")
    t = rep["targets"][0]
    assert [x["stage"] for x in t["tasks"]] == ["1 eval", "2 prune"]
    assert t["tasks"][1]["before"] == pr["before"]["score"] and t["tasks"][1]["drop"] == pr["drop"]
    from edgepack.bench.recipe_report import stage_rows, summary_rows

    cols, rows = stage_rows(t)
    assert "task (x100)" in cols and f"drop {pr['drop']:.2f}" in rows[1][cols.index("task (x100)")]
    cols, rows = summary_rows(rep)
    assert rows[0][cols.index("final task")] == f"rougeL {pr['after']['score']:.2f}"

    # an eval stage after it gates on the latest measurement of the same protocol: the prune's
    (tmp_path / "r.toml").write_text(head + f'[[stages]]\nkind = "eval"\ntask = "{self_task}"\nmax_task_drop = 0.0\n')
    again = run_recipe(load_recipe(tmp_path / "r.toml"))
    assert [r.status for r in again] == ["cached", "cached", "ran"] and again[2].metrics["task"]["drop"] == 0.0
    # ... and a lossy stage past its limit fails and writes nothing
    (tmp_path / "r.toml").write_text(head.replace("max_task_drop = 100.0", "max_task_drop = 1.0"))
    with pytest.raises(ValidationFailed, match="task rougeL dropped by .* above the limit of 1; nothing was written"):
        run_recipe(load_recipe(tmp_path / "r.toml"))
    assert len([p for p in (tmp_path / "wd").iterdir() if p.name.startswith("02-prune")]) == 1  # only the first


def test_compare_and_protocol_checks(tmp_path):
    base = {"name": "edgepack-task-v1", "task_sha256": "x", "split": "test", "split_seed": 0, "max_samples": 4,
            "max_new_tokens": 8, "metric": "rougeL", "items": 4, "task": "t.jsonl"}
    a = {"protocol": base, "metric": "rougeL", "score": 50.0, "per_item": [40.0, 60.0, 50.0, 50.0], "scored_items": 4}
    b = {"protocol": base, "metric": "rougeL", "score": 45.0, "per_item": [30.0, 60.0, 45.0, 45.0], "scored_items": 4}
    out = compare(a, b, 10.0)
    assert out["drop"] == 5.0 and out["drop_stderr"] == pytest.approx(np.std([10, 0, 5, 5], ddof=1) / 2, abs=1e-4)
    with pytest.raises(ValidationFailed, match="dropped by 5.00 points"):
        compare(a, b, 4.0)
    with pytest.raises(ConfigError, match="different protocols"):
        compare(a, {**b, "protocol": {**base, "max_new_tokens": 16}}, None)
    (tmp_path / "plain.txt").write_text("\n\n".join(f"Paragraph {i} of plain text." for i in range(20)))
    with pytest.raises(ConfigError, match="no instruction, chat or choice records"):
        load_items(tmp_path / "plain.txt", TaskProtocol())
    with pytest.raises(ConfigError, match="task file .* does not exist"):
        load_items(tmp_path / "missing.jsonl", TaskProtocol())


def test_cli_eval_task(stories, self_task, tmp_path):
    from edgepack.cli import cli

    args = ["eval", str(stories), "--task", str(self_task), "--task-split", "all", "--task-samples", "3",
            "--task-max-new-tokens", "12"]
    r = CliRunner().invoke(cli, args + ["--json", "--save-outputs", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["task"]["after"]["generation"]["n"] == 3 and "perplexity" not in out
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
    same = CliRunner().invoke(cli, args + ["--baseline", str(stories), "--max-task-drop", "0"])
    assert same.exit_code == 0 and "baseline" in same.output and "drop" in same.output
    none = CliRunner().invoke(cli, ["eval", str(stories)])
    assert none.exit_code == 1 and "'text' (perplexity) or 'task' (task metrics) is required" in none.output
