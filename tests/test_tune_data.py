"""Data preparation for `tune`: reading, malformed-line reports, cleaning, de-duplication, split, loss masks, packing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import SHARED, STORIES

from edgepack.errors import ConfigError
from edgepack.tune.data import (
    IGNORE,
    PrepareConfig,
    Record,
    clean_text,
    deduplicate,
    encode,
    load_prepared,
    pack,
    prepare,
    read_records,
    render,
    split_records,
    write_prepared,
)

ALPACA = SHARED / "data" / "alpaca-sample.jsonl"
LONG = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old red barn near the river "
        "and the children laugh at the ducks swimming in the cold water of early spring")


@pytest.fixture(scope="module")
def tok():
    if not (STORIES / "tokenizer.json").is_file():
        pytest.skip(f"stories260K tokenizer not found at {STORIES}")
    from edgepack.hf import load_tokenizer

    return load_tokenizer(STORIES)


def _write_lines(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


@pytest.fixture
def messy(tmp_path):
    ok = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    lines = [
        json.dumps(ok),                                                                    # 1 kept
        '{"instruction": "broken", ',                                                      # 2 invalid JSON
        "[1, 2]",                                                                          # 3 not an object
        json.dumps({"instruction": "no output here"}),                                     # 4 missing output
        json.dumps({"instruction": "x", "output": 7}),                                     # 5 output not a string
        "",                                                                                # 6 blank
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello there."}]}),      # 7 kept (chat)
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),                  # 8 unknown role
        json.dumps({"messages": [{"role": "user", "content": "anyone?"}]}),                # 9 no assistant -> empty
        json.dumps({"text": "  Some   <b>plain</b> text &amp; more.  "}),                # 10 kept (text, cleaned)
        json.dumps({"instruction": "NAME a colour. ", "input": "", "output": "blue."}),    # 11 exact dup of 1
        json.dumps({"text": LONG}),                                                        # 12 kept
        json.dumps({"text": LONG.replace("cold", "icy")}),                                 # 13 near dup of 12
        json.dumps({"instruction": "Fill in: a <noun>.", "output": "<p></p>"}),            # 14 output empty after markup
        b'{"text": "caf\xe9"}',                                                            # 15 not UTF-8
        json.dumps({"foo": 1}),                                                            # 16 no known keys
        json.dumps({"instruction": "Write a greeting.", "input": "<noun>", "output": "Hi, <noun>!"}),  # 17 kept
    ]
    return _write_lines(tmp_path / "messy.jsonl", lines)


def test_malformed_lines_are_reported_with_numbers_and_every_line_is_accounted_for(messy):
    prep = prepare(messy, PrepareConfig(split=(0.6, 0.2, 0.2)))
    r = prep.report
    assert [(m["line"], m["reason"].split(":")[0]) for m in r["dropped"]["malformed"]] == [
        (2, "invalid JSON"), (3, "expected a JSON object, got list"), (4, "instruction record without 'output'"),
        (5, "'output' must be a string, got int"), (8, "messages[0] has unknown role 'robot' (expected one of system, user, assistant)"),
        (15, "not UTF-8"), (16, "has none of the keys 'instruction'/'output', 'messages', 'text' or 'options'")]
    assert r["dropped"]["empty"] == [{"where": "line 9", "reason": "no assistant message"},
                                     {"where": "line 14", "reason": "empty output"}]
    assert r["dropped"]["exact_duplicate"] == [{"where": "line 11", "duplicate_of": "line 1"}]
    near = r["dropped"]["near_duplicate"]
    assert [(d["where"], d["duplicate_of"]) for d in near] == [("line 13", "line 12")] and 0.8 <= near[0]["jaccard"] < 1
    assert r["lines"] == 17 and r["blank_lines"] == 1
    assert r["lines"] == r["blank_lines"] + len(r["dropped"]["malformed"]) + r["records_read"]
    assert r["records_read"] == sum(r["dropped_counts"][k] for k in ("empty", "exact_duplicate", "near_duplicate")) + r["records_kept"]
    assert r["records_kept"] == 5 and r["kinds"] == {"instruction": 2, "chat": 1, "text": 2}
    assert sum(r["splits"].values()) == 5 and r["splits"]["validation"] == 1 and r["splits"]["test"] == 1
    kept = {rec.where: rec for recs in prep.splits.values() for rec in recs}
    assert kept["line 10"].data["text"] == "Some plain text & more."  # tags, entities, spaces
    assert kept["line 17"].data["output"] == "Hi, <noun>!"  # placeholders are content, not markup


def test_alpaca_sample(tmp_path):
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} not found")
    prep = prepare(ALPACA)
    r = prep.report
    assert r["lines"] == 2000 and r["records_read"] == 2000 and r["dropped_counts"]["malformed"] == 0
    assert r["dropped"]["empty"] == [{"where": "line 1276", "reason": "empty output"},
                                     {"where": "line 1845", "reason": "empty output"}]
    assert r["records_kept"] + r["dropped_counts"]["exact_duplicate"] + r["dropped_counts"]["near_duplicate"] == 1998
    n = r["records_kept"]
    assert r["splits"] == {"train": n - 2 * round(n / 10), "validation": round(n / 10), "test": round(n / 10)}
    write_prepared(prep, tmp_path / "p")
    again = load_prepared(tmp_path / "p")
    assert [x.data for x in again.splits["test"]] == [x.data for x in prep.splits["test"]]
    html = [x for s in prep.splits.values() for x in s if x.data["output"].startswith("<!DOCTYPE html>")]
    assert html and "<title>Pet Store</title>" in html[0].data["output"]  # a requested HTML page keeps its tags


def test_split_is_seeded_deterministic_and_disjoint():
    recs = [Record("text", {"text": f"record number {i}"}, f"line {i}") for i in range(100)]
    a = split_records(recs, PrepareConfig(seed=3))
    b = split_records(recs, PrepareConfig(seed=3))
    c = split_records(recs, PrepareConfig(seed=4))
    assert {k: len(v) for k, v in a.items()} == {"train": 80, "validation": 10, "test": 10}
    assert all([r.where for r in a[k]] == [r.where for r in b[k]] for k in a)
    assert [r.where for r in a["test"]] != [r.where for r in c["test"]]
    seen = [r.where for k in a for r in a[k]]
    assert len(seen) == len(set(seen)) == 100
    with pytest.raises(ConfigError, match="at least 3"):
        split_records(recs[:2], PrepareConfig())


def test_near_duplicate_threshold():
    a = Record("text", {"text": LONG}, "line 1")
    b = Record("text", {"text": LONG.replace("cold", "icy")}, "line 2")  # 3 of ~33 shingles differ: J ~ 0.83
    c = Record("text", {"text": " ".join(LONG.split()[:18]) + " and then everyone went home for a quiet supper"}, "line 3")
    kept, exact, near = deduplicate([a, b, c], PrepareConfig(near_dup_threshold=0.8))
    assert [r.where for r in kept] == ["line 1", "line 3"] and not exact and near[0]["where"] == "line 2"
    kept, _, near = deduplicate([a, b, c], PrepareConfig(near_dup_threshold=0.9))
    assert len(kept) == 3 and not near
    kept, _, near = deduplicate([a, b, c], PrepareConfig(near_dup_threshold=None))
    assert len(kept) == 3


def test_clean_text():
    assert clean_text("a  b\t\tc  \n\n\n\nd &lt;x&gt;<br/>e") == "a b c\n\nd <x>e"
    code = "def f(x):\n    if x:   # note\n        return 1   \n"
    assert clean_text(code) == "def f(x):\n    if x: # note\n        return 1"  # indentation kept
    assert clean_text("zero\u200bwidth\x07 bell") == "zerowidth bell"
    assert clean_text(" <nooutput> ") == "" and clean_text("<No Input>") == ""  # Alpaca's empty-field markers
    assert clean_text("<div>keep</div> <!-- gone -->", strip_markup=False) == "<div>keep</div> <!-- gone -->"


def test_txt_paragraphs_have_line_numbers(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("FIRST:\nHello there.\n\n\nSECOND:\nGood day.\nYes.\n")
    recs, bad, counts = read_records(p)
    assert [(r.where, r.data["text"]) for r in recs] == [("line 1", "FIRST:\nHello there."),
                                                          ("line 5", "SECOND:\nGood day.\nYes.")]
    assert not bad and counts == {"lines": 7, "blank_lines": 2}
    from edgepack.tune.data import _join_paragraphs

    joined = _join_paragraphs(recs)  # one document: trained as one stream, as perplexity reads it
    assert len(joined) == 1 and joined[0].data["text"] == "FIRST:\nHello there.\n\nSECOND:\nGood day.\nYes."


def test_instruction_loss_mask_covers_only_the_response(tok):
    rec = Record("instruction", {"instruction": "Say hello.", "input": "to Bob", "output": "Hello, Bob!"}, "line 1")
    segs = render(rec, tok)
    assert "".join(s for s, _ in segs) == "### Instruction:\nSay hello.\n\n### Input:\nto Bob\n\n### Response:\nHello, Bob!"
    ids, labels = encode(rec, tok)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == len(labels)
    trained = [t for t in labels if t != IGNORE]
    assert trained[-1] == tok.eos_token_id
    assert tok.decode(trained[:-1]).strip() == "Hello, Bob!"
    first = labels.index(trained[0])
    assert all(x == IGNORE for x in labels[:first]) and labels[first:] == ids[first:]
    assert "Response" in tok.decode(ids[:first])


def test_chat_loss_mask_default_and_with_a_chat_template(tok):
    rec = Record("chat", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                                       {"role": "assistant", "content": "Goodbye."}]}, "line 1")
    ids, labels = encode(rec, tok)
    runs, cur = [], []
    for t in labels + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur).strip())
            cur = []
    assert runs == ["Hello.", "Goodbye."] or runs == ["Hello.", "Goodbye.</s>"]
    import copy

    tmpl = copy.copy(tok)
    tmpl.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    segs = render(rec, tmpl)
    assert [s for s, t in segs if t] == ["Hello.<|end|>", "Goodbye.<|end|>"]
    assert "".join(s for s, _ in segs) == tmpl.apply_chat_template(rec.data["messages"], tokenize=False)
    ids, labels = encode(rec, tmpl)
    assert tok.decode([t for t in labels if t != IGNORE]).replace(" ", "").startswith("Hello.<|end|>Goodbye.<|end|>")


def test_text_records_train_on_every_token_and_pack(tok):
    ex = [encode(Record("text", {"text": f"Story {i}: the cat sat."}, "x"), tok) for i in range(7)]
    assert all(lab[0] == IGNORE and lab[1:] == ids[1:] for ids, lab in ex)  # BOS is never a target
    total = sum(len(e[0]) for e in ex)
    blocks, labels = pack(ex, 16, pad_id=tok.eos_token_id)
    assert len(blocks) == -(-total // 16) and all(len(b) == 16 for b in blocks)
    flat = [t for b in blocks for t in b][:total]
    assert flat == [t for e in ex for t in e[0]]
    pad = len(blocks) * 16 - total
    assert labels[-1][16 - pad:] == [IGNORE] * pad


def test_prepare_cli(messy, tmp_path):
    from edgepack.cli import cli

    out = tmp_path / "prep"
    res = CliRunner().invoke(cli, ["tune", "prepare", str(messy), "-o", str(out), "--split", "0.6,0.2,0.2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert data["records_kept"] == 5 and data["dropped_counts"]["malformed"] == 7
    assert sum(1 for _ in open(out / "train.jsonl")) == 3
    res = CliRunner().invoke(cli, ["tune", "prepare", str(messy), "-o", str(tmp_path / "p2"), "--strict"])
    assert res.exit_code == 1 and "line 2: invalid JSON" in res.output and "7 malformed" in res.output
    res = CliRunner().invoke(cli, ["tune", "prepare", str(messy), "-o", str(tmp_path / "p3"), "--split", "0.5,0.5"])
    assert res.exit_code == 1 and "split must be three non-negative fractions" in res.output
