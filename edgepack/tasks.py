"""Task quality: does the model still answer held-out questions? Generation metrics (exact match, token F1, ROUGE-L,
BLEU) and multiple-choice accuracy by log-likelihood, for any runnable artifact (hf, torch-quant, onnx, compiled),
so the same numbers can be taken after tune, prune, quantize and compile. Every number carries its protocol.

Protocol `edgepack-task-v1`:
  - items: the instruction, chat and choice records of a task file (tune.data reads it: the same cleaning,
    de-duplication and seeded 8:1:1 split `tune` uses, so with the tune's data_seed the "test" split holds exactly
    the records tuning never saw; a `tune prepare` folder gives its own split files; split "all" takes every record
    of a file meant only for evaluation). Text records are not tasks (counted as skipped). The first `max_samples`
    items of the split, in file order.
  - prompt: the record formatted as tune trains it (tune.data.prompt_and_reference: the tokenizer's chat template
    with the generation prompt, else edgepack's documented `### Instruction:` template), BOS once. A model tuned on
    such records is asked the way it learned; the prompt is cut from the left to leave `max_new_tokens` of context.
  - generation: greedy (deploy.generation.generate on deploy.runtime.open_runtime), at most `max_new_tokens`, stopping
    at EOS; the response is the decoded new tokens without special tokens, stripped.
    exact_match and f1: the SQuAD v1.1 evaluation script's definitions (normalize: lower case, drop punctuation and
    the articles a/an/the, collapse whitespace; F1 of the normalized token multisets; both empty = 1).
    rougeL: rouge-score's RougeScorer(["rougeL"], use_stemmer=True) F-measure (reference first, prediction second).
    bleu: sacrebleu corpus BLEU (default 13a tokenization and exponential smoothing; signature recorded).
    Per-item scores are averaged; everything is reported x100.
  - choice records: lm-evaluation-harness's multiple_choice scoring. Per option, (context, continuation) =
    (prompt, option text), trailing whitespace of the context moved to the continuation; whole = tokens of
    context + continuation, continuation tokens = whole[len(context tokens):]; log-likelihood = sum of log-softmax
    (fp64) of the continuation tokens given everything before (runtime.forward_logits, one pass, the input cut from
    the left to the context length). acc: argmax of the sums is the answer; acc_norm: argmax of sum / the option's
    length in characters.
  - noise: every mean carries its standard error (sample standard deviation / sqrt(n)); BLEU's is a seeded bootstrap
    over items. A before/after comparison on the same items reports the paired standard error of the drop.

The gate (`max_task_drop` of eval / quantize / prune / distill): drop = score before - score after, in points of the
gated metric (rougeL for generation items, else acc), on the same items under the same protocol.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgepack.errors import ConfigError, ValidationFailed

PROTOCOL_NAME = "edgepack-task-v1"
SPLITS = ("test", "validation", "all")
METRICS = ("auto", "exact_match", "f1", "rougeL", "acc", "acc_norm")  # gateable (per-item) metrics
GENERATION_METRICS = ("exact_match", "f1", "rougeL", "bleu")
CHOICE_METRICS = ("acc", "acc_norm")
BLEU_BOOTSTRAP = 100  # resamples for BLEU's standard error


@dataclass(frozen=True)
class TaskProtocol:
    split: str = field(default="test", metadata={"choices": SPLITS})  # held-out split of the task file, or "all"
    split_seed: int = 0  # seed of the 8:1:1 split (tune's data_seed)
    max_samples: int | None = 64  # items scored, the first of the split (None: all)
    max_new_tokens: int = 64  # generation limit per item
    metric: str = field(default="auto", metadata={"choices": METRICS})  # what a gate compares

    def validate(self) -> list[str]:
        errs = []
        if self.split not in SPLITS:
            errs.append(f"task split must be one of {', '.join(SPLITS)}")
        if self.max_samples is not None and self.max_samples < 1:
            errs.append("task samples must be >= 1 (or unset for all)")
        if self.max_new_tokens < 1:
            errs.append("task max_new_tokens must be >= 1")
        if self.metric not in METRICS:
            errs.append(f"task metric must be one of {', '.join(METRICS)}")
        return errs


# --------------------------------------------------------------------------------------------------- the items
def load_items(task, protocol: TaskProtocol) -> tuple[list, dict]:
    """(records to score, provenance {task, sha256, split, items, skipped}) of a task file or `tune prepare` folder."""
    from edgepack.artifact import sha256_file
    from edgepack.tune.data import PrepareConfig, load_prepared, prepare

    p = Path(task)
    if p.is_dir():
        if protocol.split == "all":
            prep = load_prepared(p)
            recs = [r for name in ("train", "validation", "test") for r in prep.splits[name]]
            digest = hashlib.sha256(b"".join(sha256_file(p / f"{n}.jsonl").encode()
                                             for n in ("train", "validation", "test"))).hexdigest()
        else:
            recs = load_prepared(p).splits[protocol.split]
            digest = sha256_file(p / f"{protocol.split}.jsonl")
    elif p.is_file():
        split = (1.0, 0.0, 0.0) if protocol.split == "all" else (0.8, 0.1, 0.1)
        prep = prepare(p, PrepareConfig(seed=protocol.split_seed, split=split))
        recs = prep.splits["train" if protocol.split == "all" else protocol.split]
        digest = sha256_file(p)
    else:
        raise ConfigError(f"task file '{p}' does not exist",
                          "pass JSONL instruction / chat / choice records, or a 'tune prepare' folder")
    items = [r for r in recs if r.kind in ("instruction", "chat", "choice")]
    skipped = len(recs) - len(items)
    if protocol.max_samples is not None:
        items = items[:protocol.max_samples]
    if not items:
        raise ConfigError(f"'{p}' has no instruction, chat or choice records in its {protocol.split} split",
                          "task metrics need records with a prompt and an answer (instruction/output, messages, or "
                          "options/answer)")
    return items, {"task": p.name, "task_sha256": digest, "split": protocol.split, "items": len(items),
                   "skipped_text_records": skipped}


# ----------------------------------------------------------------------------------------------------- metrics
def normalize_answer(s: str) -> str:
    """The SQuAD v1.1 evaluation script's normalize_answer."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _rouge_scorer():
    from edgepack.errors import require

    require("rouge_score", "eval", "ROUGE-L of generated answers")
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """(sacrebleu corpus BLEU, its signature)."""
    from edgepack.errors import require

    sacrebleu = require("sacrebleu", "eval", "BLEU of generated answers")
    metric = sacrebleu.metrics.BLEU()
    return float(metric.corpus_score(predictions, [references]).score), str(metric.get_signature())


def _mean_se(values) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def _bleu_se(preds: list[str], refs: list[str]) -> float | None:
    if len(preds) < 2:
        return None
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(BLEU_BOOTSTRAP):
        idx = rng.integers(0, len(preds), len(preds))
        scores.append(corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx])[0])
    return float(np.std(scores, ddof=1))


# ------------------------------------------------------------------------------------------------ model access
def _with_bos(ids: list[int], tok) -> list[int]:
    bos = tok.bos_token_id
    return [bos] + ids if bos is not None and not (ids and ids[0] == bos) else ids


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def option_loglik(runtime, tok, context: str, option: str, context_len: int | None) -> float:
    """Sum of log p(option tokens | context), lm-evaluation-harness's _encode_pair and loglikelihood (see module doc)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, option = context[:-n_space], context[-n_space:] + option
    ctx = _with_bos(tok(context, add_special_tokens=False)["input_ids"], tok)
    whole = _with_bos(tok(context + option, add_special_tokens=False)["input_ids"], tok)
    cont = whole[len(ctx):]
    if not cont:
        raise ConfigError(f"option {option!r} adds no tokens to its prompt", "give every option some text")
    seq = (ctx + cont)
    if context_len and len(seq) > context_len + 1:
        seq = seq[-(context_len + 1):]  # cut from the left, as the harness does
    inp = np.asarray([seq[:-1]], dtype=np.int64)
    logits = np.asarray(runtime.forward_logits(inp))[0]
    lp = _log_softmax_rows(logits[-len(cont):])
    return float(lp[np.arange(len(cont)), cont].sum())


def _generate(runtime, tok, prompt: str, protocol: TaskProtocol, context_len: int | None) -> tuple[str, dict]:
    from edgepack.deploy.generation import GenerationConfig, generate

    ids = _with_bos(tok(prompt, add_special_tokens=False)["input_ids"], tok)
    truncated = False
    if context_len and len(ids) + protocol.max_new_tokens > context_len:
        keep = max(1, context_len - protocol.max_new_tokens)
        ids, truncated = ids[-keep:], True
    eos = tok.eos_token_id
    stop = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    res = generate(runtime, [ids], GenerationConfig(max_new_tokens=protocol.max_new_tokens, stop_token_ids=stop))
    new = [int(t) for t in res.tokens[0]]
    if stop and new and new[-1] in stop:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True).strip(), {"new_tokens": len(new), "eos": res.stopped == "stop_token",
                                                               "truncated": truncated}


def resolved_metric(protocol: TaskProtocol, items) -> str:
    if protocol.metric != "auto":
        return protocol.metric
    return "rougeL" if any(r.kind != "choice" for r in items) else "acc"


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class TaskResult:
    summary: dict  # {"generation": {...}, "choice": {...}, "score", "metric", "protocol", ...}
    outputs: list[dict]  # per item: where, kind, prompt, reference, prediction / option log-likelihoods, scores

    def per_item(self) -> list[float]:
        """The gated metric per item (x100), in item order."""
        return [o[self.summary["metric"]] for o in self.outputs if self.summary["metric"] in o]


def evaluate_task(art, task, protocol: TaskProtocol = TaskProtocol(), *, runtime: str | None = None,
                  threads: int | None = None, progress=None, opened=None) -> TaskResult:
    """Task metrics of any runnable artifact on a task file's held-out items (the module docstring's protocol).
    `opened` = (runtime object, tokenizer) reuses a loaded model."""
    from edgepack.deploy.runtime import open_runtime, resolve_runtime
    from edgepack.facts import context_length
    from edgepack.hf import load_tokenizer
    from edgepack.tune.data import prompt_and_reference

    errs = protocol.validate()
    if errs:
        raise ConfigError("task protocol: " + "; ".join(errs), "change the values named (each says what it must be)")
    items, prov = load_items(task, protocol)
    if opened is None:
        rt, tok = open_runtime(art, runtime, threads=threads), load_tokenizer(art.path)
    else:
        rt, tok = opened
    ctx_len = context_length(art)
    metric = resolved_metric(protocol, items)
    need_rouge = any(r.kind != "choice" for r in items)
    rouge = _rouge_scorer() if need_rouge else None
    outputs = []
    for i, rec in enumerate(items):
        prompt, reference = prompt_and_reference(rec, tok)
        out = {"where": rec.where, "kind": rec.kind}
        if rec.kind == "choice":
            lls = [option_loglik(rt, tok, prompt, o, ctx_len) for o in rec.data["options"]]
            norm = [ll / len(o) for ll, o in zip(lls, rec.data["options"])]
            ans = rec.data["answer"]
            out.update(options=rec.data["options"], answer=ans, loglik=[round(x, 5) for x in lls],
                       pred=int(np.argmax(lls)), pred_norm=int(np.argmax(norm)),
                       acc=100.0 * (int(np.argmax(lls)) == ans), acc_norm=100.0 * (int(np.argmax(norm)) == ans))
        else:
            pred, info = _generate(rt, tok, prompt, protocol, ctx_len)
            out.update(prompt=prompt, reference=reference, prediction=pred, **info,
                       exact_match=100.0 * exact_match(pred, reference), f1=100.0 * token_f1(pred, reference),
                       rougeL=100.0 * rouge.score(reference, pred)["rougeL"].fmeasure)
        outputs.append(out)
        if progress:
            progress(i + 1, len(items))
    summary = {"protocol": {"name": PROTOCOL_NAME, **asdict(protocol), **prov, "metric": metric,
                            "runtime": resolve_runtime(art, runtime)}, "metric": metric}
    gen = [o for o in outputs if o["kind"] != "choice"]
    if gen:
        g = {"n": len(gen)}
        for m in ("exact_match", "f1", "rougeL"):
            g[m], g[f"{m}_stderr"] = _mean_se([o[m] for o in gen])
        preds, refs = [o["prediction"] for o in gen], [o["reference"] for o in gen]
        g["bleu"], g["bleu_signature"] = corpus_bleu(preds, refs)
        g["bleu_stderr"] = _bleu_se(preds, refs)
        g["mean_new_tokens"] = float(np.mean([o["new_tokens"] for o in gen]))
        g["stopped_at_eos"] = sum(o["eos"] for o in gen)
        g["truncated_prompts"] = sum(o["truncated"] for o in gen)
        summary["generation"] = _rounded(g)
    ch = [o for o in outputs if o["kind"] == "choice"]
    if ch:
        c = {"n": len(ch)}
        for m in CHOICE_METRICS:
            c[m], c[f"{m}_stderr"] = _mean_se([o[m] for o in ch])
        summary["choice"] = _rounded(c)
    vals = [o[metric] for o in outputs if metric in o]
    if not vals:
        raise ConfigError(f"task metric '{metric}' has no items in '{task}'",
                          f"use {'acc / acc_norm' if ch else 'exact_match / f1 / rougeL'} for these records")
    score, se = _mean_se(vals)
    summary.update(score=round(score, 4), score_stderr=None if se is None else round(se, 4), scored_items=len(vals))
    summary["per_item"] = [round(v, 3) for v in vals]
    return TaskResult(summary, outputs)


def _rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------------- comparing
def same_protocol(a: dict, b: dict) -> bool:
    keys = ("name", "task_sha256", "split", "split_seed", "max_samples", "max_new_tokens", "metric", "items")
    return all(a.get(k) == b.get(k) for k in keys)


def compare(before: dict | None, after: dict, max_drop: float | None, note: str = "; nothing was written") -> dict:
    """{"before", "after", "drop", "drop_stderr"} of two summaries on the same items; ValidationFailed past max_drop."""
    out = {"metric": after["metric"], "after": after}
    if before is None:
        return out
    if not same_protocol(before["protocol"], after["protocol"]):
        raise ConfigError("the task measurements to compare were taken under different protocols",
                          "use the same task file, split, samples and max_new_tokens")
    drop = before["score"] - after["score"]
    diff = np.asarray(before["per_item"], dtype=np.float64) - np.asarray(after["per_item"], dtype=np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None
    out.update(before=before, drop=round(drop, 4), drop_stderr=None if se is None else round(se, 4),
               max_task_drop=max_drop)
    if max_drop is not None and drop > max_drop:
        raise ValidationFailed(
            f"task {after['metric']} dropped by {drop:.2f} points ({before['score']:.2f} -> {after['score']:.2f}, "
            f"paired stderr {se if se is not None else float('nan'):.2f}) on {after['scored_items']} "
            f"{after['protocol']['task']} items, above the limit of {max_drop:g}{note}",
            "use a gentler setting (a calibrated method, less sparsity), or raise max_task_drop")
    return out


def latest_measurement(art, protocol: dict | None = None) -> dict | None:
    """The most recent task summary in the artifact's history (with `protocol`: measured under the same one)."""
    for rec in reversed(art.history):
        task = (rec.get("metrics") or {}).get("task") or {}
        after = task.get("after")
        if after and (protocol is None or same_protocol(after["protocol"], protocol)):
            return after
    return None


def stage_task_metrics(src, written, task: str, samples: int | None, max_drop: float | None) -> dict:
    """What a lossy stage records (and gates) when it names a task: the task summary of its input (taken from the
    input's own last record when that measured the same protocol, else measured now) and of the artifact it wrote
    (`written`: an Artifact of the not yet committed directory). {} without a task."""
    if not task:
        return {}
    protocol = TaskProtocol(max_samples=samples)
    after = evaluate_task(written, task, protocol).summary
    last = (src.history[-1].get("metrics") or {}).get("task", {}).get("after") if src.history else None
    reused = last is not None and same_protocol(last["protocol"], after["protocol"])
    before = last if reused else evaluate_task(src, task, protocol).summary
    out = compare(before, after, max_drop)
    out["before_from"] = "the input's own record" if reused else "measured"
    return out


def write_outputs(result: TaskResult, path) -> None:
    import json

    with open(path, "w") as f:
        for o in result.outputs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
