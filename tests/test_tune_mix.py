"""Mixing data sources for `tune`: each source split on its own (held-out sets pure and identical to the source
alone), the training split drawn by weight (token shares), deterministic per seed, reported per source; choice
records; "path:weight" sources in the CLI and in recipes (resolved against the recipe, hashed by content)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import SHARED, STORIES

from edgepack.errors import ConfigError
from edgepack.tune.data import (
    PrepareConfig,
    load_or_prepare,
    load_prepared,
    parse_sources,
    prepare,
    prepare_mix,
    prompt_and_reference,
    read_records,
    render,
    split_text,
    tokenize_splits,
    write_prepared,
)

WORDS = ("apple river stone cloud lantern meadow copper violin harbor pepper falcon candle marble orchard glacier "
         "thunder velvet compass saffron ember willow quartz").split()


def _text_file(path, n: int, seed: int, words_per: int = 30):
    import random

    rng = random.Random(seed)
    paras = [" ".join(rng.choice(WORDS) for _ in range(words_per)) + f" {path.stem}{i}." for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def _jsonl(path, n: int):
    path.write_text("".join(json.dumps({"instruction": f"Name item {i} of the list.", "input": "",
                                        "output": f"Item {i} is {WORDS[i % len(WORDS)]} number {i}."}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tok():
    if not (STORIES / "tokenizer.json").is_file():
        pytest.skip(f"stories260K tokenizer not found at {STORIES}")
    from edgepack.hf import load_tokenizer

    return load_tokenizer(STORIES)


@pytest.fixture
def files(tmp_path):
    return _jsonl(tmp_path / "domain.jsonl", 200), _text_file(tmp_path / "general.txt", 150, 1)


def test_parse_sources():
    assert [(s.path, s.weight, s.name) for s in parse_sources("a/b.jsonl")] == [("a/b.jsonl", 1.0, "b")]
    got = parse_sources(["x/d.jsonl:0.7", "y/d.jsonl:3e-1"])
    assert [(s.path, s.weight, s.name) for s in got] == [("x/d.jsonl", 0.7, "d"), ("y/d.jsonl", 0.3, "d-2")]
    with pytest.raises(ConfigError, match="of a mix has no weight"):
        parse_sources(["a.jsonl:0.7", "b.txt"])
    with pytest.raises(ConfigError, match="has weight -1"):
        parse_sources(["a.jsonl:0.7", "b.txt:-1"])


def test_mix_keeps_each_source_split_pure_and_draws_training_tokens_by_weight(files, tok):
    dom, gen = files
    srcs = parse_sources([f"{dom}:0.7", f"{gen}:0.3"])
    mix = prepare_mix(srcs, PrepareConfig(seed=5), tok)
    alone = {s.name: prepare(s.path, PrepareConfig(seed=5)) for s in srcs}
    for s in srcs:  # held-out records: exactly those of the source prepared alone, tagged with the source
        for split in ("validation", "test"):
            assert [r.data for r in mix.of_source(split, s.name)] == [r.data for r in alone[s.name].splits[split]]
        train_alone = [json.dumps(r.data, sort_keys=True) for r in alone[s.name].splits["train"]]
        drawn = [json.dumps(r.data, sort_keys=True) for r in mix.of_source("train", s.name)]
        assert set(drawn) <= set(train_alone)  # nothing held out is trained on
    rep = {s["name"]: s for s in mix.report["sources"]}
    assert mix.report["mix"] == {"strategy": "under", "unit": "tokens", "seed": 5,
                                 "train_size": sum(s["drawn"]["size"] for s in rep.values())}
    # "under": the source that runs out first is taken whole, the other sampled; no record repeats
    whole = [n for n, s in rep.items() if s["drawn"]["records"] == s["splits"]["train"]]
    assert len(whole) == 1 and all(s["drawn"]["distinct_records"] == s["drawn"]["records"] for s in rep.values())
    _, stats = tokenize_splits(mix, tok, 128)
    by = stats["train"]["by_source"]
    share = by["domain"]["tokens"] / (by["domain"]["tokens"] + by["general"]["tokens"])
    assert share == pytest.approx(0.7, abs=0.02)  # measured in the packed training tokens
    assert rep["domain"]["drawn"]["share"] == pytest.approx(0.7, abs=0.01)
    assert {k: stats[k]["by_source"]["general"]["records"] for k in ("validation", "test")} == \
        {k: len(alone["general"].splits[k]) for k in ("validation", "test")}
    again = prepare_mix(srcs, PrepareConfig(seed=5), tok)
    assert [r.where for r in again.splits["train"]] == [r.where for r in mix.splits["train"]]
    other = prepare_mix(srcs, PrepareConfig(seed=6), tok)
    assert [r.where for r in other.splits["train"]] != [r.where for r in mix.splits["train"]]
    assert mix.source_weights() == {"domain": 0.7, "general": 0.3}


def test_over_strategy_repeats_the_short_source_and_drops_nothing(files, tok):
    dom, gen = files
    mix = prepare_mix(parse_sources([f"{dom}:0.2", f"{gen}:0.8"]), PrepareConfig(mix_strategy="over"), tok)
    rep = {s["name"]: s for s in mix.report["sources"]}
    assert rep["general"]["drawn"]["whole_copies"] >= 1 and rep["domain"]["drawn"]["records"] == rep["domain"]["splits"]["train"]
    assert rep["general"]["drawn"]["records"] > rep["general"]["splits"]["train"]  # repeated
    assert rep["general"]["drawn"]["share"] == pytest.approx(0.8, abs=0.02)
    chars = prepare_mix(parse_sources([f"{dom}:0.5", f"{gen}:0.5"]), PrepareConfig())  # no tokenizer: characters
    assert chars.report["mix"]["unit"] == "characters"


def test_mix_round_trips_through_a_prepared_folder(files, tok, tmp_path):
    dom, gen = files
    mix = load_or_prepare([f"{dom}:0.7", f"{gen}:0.3"], PrepareConfig(), tok)
    write_prepared(mix, tmp_path / "p")
    back = load_prepared(tmp_path / "p")
    assert back.source_weights() == {"domain": 0.7, "general": 0.3}
    assert [(r.source, r.data) for r in back.splits["test"]] == [(r.source, r.data) for r in mix.splits["test"]]
    text = split_text(back, "test", source="general")
    assert text and "domain" not in text and "### Instruction" in split_text(back, "test", source="domain")
    b1, _ = tokenize_splits(back, tok, 64)
    b2, _ = tokenize_splits(mix, tok, 64)
    assert b1["train"][0].equal(b2["train"][0])
    with pytest.raises(ConfigError, match="a mix reads data files"):
        prepare_mix(parse_sources([f"{tmp_path / 'p'}:0.5", f"{gen}:0.5"]))


def test_cli_prepare_mix(files, tmp_path):
    from edgepack.cli import cli

    dom, gen = files
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["tune", "prepare", "--mix", f"{dom}:0.7", "--mix", f"{gen}:0.3", "-o", str(out),
                                 "--model", str(STORIES), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert [s["name"] for s in rep["sources"]] == ["domain", "general"] and rep["mix"]["unit"] == "tokens"
    assert set(rep["tokens"]["test"]["by_source"]) == {"domain", "general"}
    assert (out / "report.json").is_file() and json.loads((out / "test.jsonl").read_text().splitlines()[0])["source"]
    table = CliRunner().invoke(cli, ["tune", "prepare", "--mix", f"{dom}:0.7", "--mix", f"{gen}:0.3", "-o",
                                     str(tmp_path / "t")])
    assert table.exit_code == 0 and "weights are shares of training characters" in table.output
    both = CliRunner().invoke(cli, ["tune", "prepare", str(dom), "--mix", f"{gen}:0.3", "-o", str(tmp_path / "x")])
    assert both.exit_code == 1 and "DATA and --mix are exclusive" in both.output
    bad = CliRunner().invoke(cli, ["tune", "prepare", "--mix", f"{dom}:0.7", "--mix", str(gen), "-o", str(tmp_path / "y")])
    assert bad.exit_code == 1 and "has no weight" in bad.output


def test_choice_records(tmp_path, tok):
    p = tmp_path / "mc.jsonl"
    rows = [{"question": "Which is a fruit?", "options": ["stone", "apple"], "answer": 1},
            {"instruction": "Pick the colour.", "choices": ["red", "run", "rock"], "answer": "A"},
            {"instruction": "Pick the metal.", "options": ["copper", "cloud"], "answer": "copper"},
            {"instruction": "Bad.", "options": ["x"], "answer": 0},
            {"instruction": "Bad answer.", "options": ["x", "y"], "answer": 2},
            {"instruction": "Bool.", "options": ["x", "y"], "answer": True}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, bad, _ = read_records(p)
    assert [r.data["answer"] for r in recs] == [1, 0, 0] and [r.kind for r in recs] == ["choice"] * 3
    assert [b["line"] for b in bad] == [4, 5, 6] and "at least 2 strings" in bad[0]["reason"]
    assert "must name one of the 2 options" in bad[1]["reason"]
    segs = render(recs[0], tok)  # trains as an instruction record whose output is the right option
    assert segs[-1] == ("apple", True) and segs[0][0].startswith("### Instruction:\nWhich is a fruit?")
    assert prompt_and_reference(recs[0], tok) == ("### Instruction:\nWhich is a fruit?\n\n### Response:\n", "apple")


def test_recipe_mix_paths_resolve_and_hash_by_content(tmp_path, files):
    from edgepack.plan import load_recipe, step_hash

    pytest.importorskip("peft")
    dom, gen = files
    model = SHARED / "models" / "stories260K"
    body = f"""[recipe]
name = "m"
model = "{model}"
[[stages]]
kind = "tune"
data = ["domain.jsonl:0.7", "general.txt:0.3"]
steps = 2
"""
    (tmp_path / "r.toml").write_text(body)
    rec = load_recipe(tmp_path / "r.toml")
    assert rec.steps[0].config.data == (f"{tmp_path}/domain.jsonl:0.7", f"{tmp_path}/general.txt:0.3")
    h1 = step_hash("p", rec.steps[0], None)
    gen.write_text(gen.read_text() + "\nOne more paragraph.\n")
    h2 = step_hash("p", rec.steps[0], None)
    (tmp_path / "r.toml").write_text(body.replace("0.3", "0.4"))
    h3 = step_hash("p", load_recipe(tmp_path / "r.toml").steps[0], None)
    assert len({h1, h2, h3}) == 3
    (tmp_path / "r.toml").write_text(body.replace('"general.txt:0.3"', '"general.txt"'))
    with pytest.raises(ConfigError, match="of a mix has no weight"):
        load_recipe(tmp_path / "r.toml")
