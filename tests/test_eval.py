"""Perplexity protocol edgepack-ppl-v1 agrees with an independent plain-transformers computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.artifact import open_artifact
from edgepack.quality import PplProtocol, evaluate_artifact, perplexity, plan_windows, sqnr_db


def independent_ppl(model_dir, text_path, window=512, stride=256):
    """The sliding-window recipe from the transformers docs ("Perplexity of fixed-length models"): model loss
    with labels masked to -100 outside each window's new tokens; BOS prepended once to the stream."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = open(text_path, encoding="utf-8").read()
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    n = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # the loss shifts labels left by one: label 0 is never scored
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_stories260k_matches_independent_transformers_to_4_significant_digits(stories, tinystories_text):
    ours = evaluate_artifact(open_artifact(stories), tinystories_text, PplProtocol())
    ref, ref_tokens = independent_ppl(stories, tinystories_text)
    assert ours.tokens == ref_tokens
    assert f"{ours.perplexity:.4g}" == f"{ref:.4g}", (ours.perplexity, ref)
    assert 4.5 < ours.perplexity < 5.0  # 4.744 when this test was written
    assert ours.protocol["name"] == "edgepack-ppl-v1" and ours.protocol["window"] == 512 and ours.protocol["stride"] == 256
    assert len(ours.protocol["text_sha256"]) == 64


def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (1000, 512, 256), (513, 512, 512), (7, 16, 8)]:
        proto = PplProtocol(window=w, stride=s)
        covered = []
        for b, e, first, take in plan_windows(n, proto):
            assert 1 <= first and first + take <= e - b
            covered += list(range(b + first, b + first + take))
        assert covered == sorted(set(covered))  # once each, in order
        expected = set(range(1, n)) - ({*range(w, n, s)} if s == w else set())
        assert set(covered) == expected


def test_uniform_model_has_vocab_perplexity():
    vocab = 37
    ppl = perplexity(lambda ids: np.zeros((*ids.shape, vocab), np.float32), list(range(1, 30)),
                     PplProtocol(window=8, stride=4))
    assert ppl.perplexity == pytest.approx(vocab, rel=1e-9)
    assert ppl.tokens == 28


def test_max_tokens_caps_work():
    res = perplexity(lambda ids: np.zeros((*ids.shape, 5), np.float32), [i % 5 for i in range(100)],
                     PplProtocol(window=16, stride=8, max_tokens=10))
    assert res.tokens == 10


def test_sqnr():
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)  # noise 1/10 of the signal amplitude


def test_jsonl_text_is_read_as_records_never_as_raw_json(tiny_model, tmp_path):
    """`tune prepare` writes test.jsonl: `eval --text test.jsonl` scores its records as the text tune scores
    (split_text), not the JSON syntax; a line that is not a record is refused with its line number."""
    from click.testing import CliRunner

    from edgepack.cli import cli
    from edgepack.tune.data import PrepareConfig, prepare, split_text, write_prepared

    src = tmp_path / "story.txt"
    src.write_text("\n\n".join(f"Paragraph {i}: the cat sat on mat number {i} and ate {i} fish." for i in range(40)))
    prep = prepare(src, PrepareConfig())
    write_prepared(prep, tmp_path / "prep")
    (tmp_path / "test.txt").write_text(split_text(prep, "test"))
    art = open_artifact(tiny_model)
    from_jsonl = evaluate_artifact(art, tmp_path / "prep" / "test.jsonl")
    from_txt = evaluate_artifact(art, tmp_path / "test.txt")
    assert from_jsonl.tokens == from_txt.tokens and from_jsonl.perplexity == pytest.approx(from_txt.perplexity, rel=1e-9)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txet": "typo"}\n')
    res = CliRunner().invoke(cli, ["eval", str(tiny_model), "--text", str(bad)])
    assert res.exit_code == 1 and "line 2 is not one" in res.output and "Traceback" not in res.output
