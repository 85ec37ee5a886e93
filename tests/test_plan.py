"""The recipe runner: content-hashed outputs, resume after a crash, no work on a re-run, fan-out per target."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack import stages
from edgepack.artifact import ArtifactWriter, link_files, stage_record
from edgepack.errors import ConfigError
from edgepack.plan import load_recipe, run_recipe


@dataclass(frozen=True)
class TagConfig:
    label: str = "x"
    fail: bool = False


CALLS: list[tuple[str, str | None]] = []


def tag_stage(src, cfg, target, out, *, force=False):
    """A cheap per-target stage for the runner's tests: links the parent's files and records a label."""
    CALLS.append((cfg.label, target.name if target else None))
    if cfg.fail:
        raise RuntimeError("simulated crash")
    with ArtifactWriter(out, force=force) as w:
        link_files(src, w.path)
        rec = stage_record("tag", {"label": cfg.label}, 0.0, {"label_len": len(cfg.label)},
                           target=target.name if target else None, parent=src.digest())
        return w.commit(format=src.format, record=rec, parent=src)


@pytest.fixture()
def tag_registered(monkeypatch):
    monkeypatch.setitem(stages.REGISTRY, "tag", stages.StageSpec("tag", f"{__name__}:TagConfig", f"{__name__}:tag_stage",
                                                                True, "test stage"))
    CALLS.clear()


def _recipe(tmp_path: Path, model: Path, body: str, targets='["cpu-x86-64"]') -> Path:
    p = tmp_path / "r.toml"
    p.write_text(f'[recipe]\nname = "t"\nmodel = "{model}"\ntargets = {targets}\nworkdir = "wd"\n' + body)
    return p


def test_rerun_does_no_work_and_outputs_are_content_hashed(tmp_path, tiny_model, tag_registered):
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "convert"\n[[stages]]\nkind = "tag"\nlabel = "a"\n')
    first = run_recipe(load_recipe(p))
    assert [r.status for r in first] == ["ran", "ran"]
    t0 = time.perf_counter()
    second = run_recipe(load_recipe(p))
    assert [r.status for r in second] == ["cached", "cached"]
    assert [r.path for r in second] == [r.path for r in first]
    assert time.perf_counter() - t0 < 10
    assert (tmp_path / "wd" / "run.json").is_file()
    # a changed config changes only the affected stage's output
    p.write_text(p.read_text().replace('label = "a"', 'label = "b"'))
    third = run_recipe(load_recipe(p))
    assert [r.status for r in third] == ["cached", "ran"] and third[1].path != first[1].path


def test_a_stage_that_only_adds_evidence_still_rekeys_what_follows(tmp_path, tiny_model, tag_registered):
    """tag (like bench) links the model files unchanged and records numbers: a re-run of it with another config
    must give the stages after it a new key, or a bundle would keep the old evidence."""
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "tag"\nlabel = "a"\n[[stages]]\nkind = "tag"\nlabel = "z"\n')
    first = run_recipe(load_recipe(p))
    p.write_text(p.read_text().replace('label = "a"', 'label = "b"'))
    second = run_recipe(load_recipe(p))
    assert [r.status for r in second] == ["ran", "ran"] and second[1].path != first[1].path
    assert [r.status for r in run_recipe(load_recipe(p), dry_run=True)] == ["cached", "cached"]


def test_crash_midway_then_resume_without_redoing(tmp_path, tiny_model, tag_registered):
    body = '[[stages]]\nkind = "convert"\n[[stages]]\nkind = "tag"\nlabel = "one"\n[[stages]]\nkind = "tag"\nlabel = "two"\nfail = true\n'
    p = _recipe(tmp_path, tiny_model, body)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(load_recipe(p))
    leftovers = [x.name for x in (tmp_path / "wd").rglob(".*partial*")]
    assert leftovers == []
    p.write_text(p.read_text().replace("fail = true\n", ""))
    CALLS.clear()
    res = run_recipe(load_recipe(p))
    assert [r.status for r in res] == ["cached", "cached", "ran"]
    assert CALLS == [("two", "cpu-x86-64")]


def test_fan_out_per_target_shares_the_prefix(tmp_path, tiny_model, tag_registered):
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "convert"\n[[stages]]\nkind = "tag"\n',
                targets='["cpu-x86-64", "jetson-orin-nano-8gb"]')
    res = run_recipe(load_recipe(p))
    assert [(r.kind, r.target) for r in res] == [("convert", None), ("tag", "cpu-x86-64"), ("tag", "jetson-orin-nano-8gb")]
    assert Path(res[1].path).parent.name == "cpu-x86-64" and Path(res[2].path).parent.name == "jetson-orin-nano-8gb"


def test_a_shared_kind_after_the_fan_out_belongs_to_its_branch(tmp_path, tiny_model, tag_registered):
    """convert is not target-specific, but after a per-target stage it runs once per branch: run.json and the
    report attribute each run to its target (an eval after compile), not to every target."""
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "tag"\n[[stages]]\nkind = "convert"\n',
                targets='["cpu-x86-64", "jetson-orin-nano-8gb"]')
    res = run_recipe(load_recipe(p))
    assert [(r.kind, r.target) for r in res] == [("tag", "cpu-x86-64"), ("convert", "cpu-x86-64"),
                                                 ("tag", "jetson-orin-nano-8gb"), ("convert", "jetson-orin-nano-8gb")]
    run = json.loads((tmp_path / "wd" / "run.json").read_text())
    assert [s["target"] for s in run["steps"]] == ["cpu-x86-64"] * 2 + ["jetson-orin-nano-8gb"] * 2


def test_dry_run_executes_nothing(tmp_path, tiny_model, tag_registered):
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "convert"\ndtype = "float16"\n[[stages]]\nkind = "tag"\n')
    res = run_recipe(load_recipe(p), dry_run=True)
    assert [r.status for r in res] == ["planned", "planned"]
    assert res[0].metrics == {"dtype": "float16"}
    assert not (tmp_path / "wd").exists() and CALLS == []


def test_input_model_is_never_modified(tmp_path, tiny_model):
    from edgepack.artifact import hash_files

    before = hash_files(tiny_model)
    p = _recipe(tmp_path, tiny_model, '[[stages]]\nkind = "convert"\ndtype = "bfloat16"\n')
    run_recipe(load_recipe(p))
    assert hash_files(tiny_model) == before


def test_data_file_content_is_part_of_the_hash(tmp_path, tiny_model):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 20)
    p = _recipe(tmp_path, tiny_model, f'[[stages]]\nkind = "eval"\ntext = "{text}"\nwindow = 32\n')
    a = run_recipe(load_recipe(p))
    text.write_text("Once upon a time there was a dog. " * 20)
    b = run_recipe(load_recipe(p))
    assert b[0].status == "ran" and a[0].path != b[0].path


@pytest.mark.parametrize("body,message", [
    ('[[stages]]\nkind = "convrt"\n', "unknown stage kind 'convrt' (did you mean 'convert'?)"),
    ('[[stages]]\nkind = "convert"\ndtyp = "float16"\n', "unknown key 'dtyp' (did you mean 'dtype'?)"),
    ('[[stages]]\nkind = "convert"\ndtype = "int3"\n', "dtype must be one of float32, float16, bfloat16"),
    ('[[stages]]\nkind = "eval"\nwindow = "big"\n', "'window' must be int, got 'big'"),
    ('[[stage]]\nkind = "convert"\n', "unknown top-level table 'stage' (did you mean 'stages'?)"),
])
def test_recipe_errors_name_the_problem(tmp_path, tiny_model, body, message):
    with pytest.raises(ConfigError) as exc:
        load_recipe(_recipe(tmp_path, tiny_model, body))
    assert message in str(exc.value)


def test_example_and_demo_recipes_load():
    from edgepack.sources import embedded_path

    root = Path(__file__).resolve().parents[1]
    recipes = [embedded_path("demo.toml"), *sorted((root / "examples").glob("*.toml"))]
    for r in recipes:
        rec = load_recipe(r)
        assert rec.steps, r


def test_per_target_settings_and_skip(tmp_path, tiny_model, tag_registered):
    body = ('[[stages]]\nkind = "convert"\n[[stages]]\nkind = "tag"\nlabel = "a"\n'
            '[stages.per_target.jetson-orin-nano-8gb]\nlabel = "jet"\n'
            '[stages.per_target.h100-sxm]\nskip = "not for this one"\n'
            '[[stages]]\nkind = "tag"\nlabel = "z"\n')
    p = _recipe(tmp_path, tiny_model, body, targets='["cpu-x86-64", "jetson-orin-nano-8gb", "h100-sxm"]')
    res = run_recipe(load_recipe(p))
    assert CALLS == [("a", "cpu-x86-64"), ("z", "cpu-x86-64"), ("jet", "jetson-orin-nano-8gb"),
                     ("z", "jetson-orin-nano-8gb"), ("z", "h100-sxm")]
    skipped = [r for r in res if r.status == "skipped"]
    assert [(r.kind, r.target, r.metrics) for r in skipped] == [("tag", "h100-sxm", {"skipped": "not for this one"})]
    assert skipped[0].path == res[0].path  # the convert output passes on unchanged
    summary = json.loads((tmp_path / "wd" / "run.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ran", "ran", "ran", "ran", "ran", "skipped", "ran"]
    CALLS.clear()
    again = run_recipe(load_recipe(p))
    assert CALLS == [] and [r.status for r in again] == ["cached"] * 5 + ["skipped", "cached"]
    # a cached step reports the seconds it took when it ran (its manifest's record), not the 0.0 s of finding it
    recorded = json.loads((Path(res[0].path) / "edgepack.json").read_text())["history"][-1]["seconds"]
    assert recorded > 0 and again[0].seconds == pytest.approx(recorded, abs=0.01)


def test_dry_run_names_what_a_skipped_stage_passes_on(tmp_path, tiny_model, tag_registered):
    body = ('[[stages]]\nkind = "convert"\n[[stages]]\nkind = "tag"\nlabel = "a"\n'
            '[[stages]]\nkind = "tag"\nlabel = "b"\n[stages.per_target.h100-sxm]\nskip = "not here"\n')
    p = _recipe(tmp_path, tiny_model, body, targets='["cpu-x86-64", "h100-sxm"]')
    planned = run_recipe(load_recipe(p), dry_run=True)
    skipped = [r for r in planned if r.status == "skipped"]
    tag_a = next(r for r in planned if r.kind == "tag" and r.target == "h100-sxm")
    assert len(skipped) == 1 and skipped[0].path == tag_a.path  # the planned output of the step before, not the input
    assert str(tmp_path) in skipped[0].path and str(tiny_model) not in skipped[0].path


@pytest.mark.parametrize("body,message", [
    ('[[stages]]\nkind = "tag"\n[stages.per_target.h100-sxm]\nlabel = "x"\n', "per_target names 'h100-sxm', which is not"),
    ('[[stages]]\nkind = "convert"\n[stages.per_target.cpu-x86-64]\ndtype = "float16"\n', "per_target needs a target-specific"),
    ('[[stages]]\nkind = "tag"\n[stages.per_target.cpu-x86-64]\nlabl = "x"\n', "unknown key 'labl'"),
])
def test_per_target_errors(tmp_path, tiny_model, tag_registered, body, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, tiny_model, body))


def test_hub_id_model_is_fetched_only_when_running(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: fetched.append((repo, kw["allow_patterns"])) or str(tiny_model))
    p = _recipe(tmp_path, "someorg/some-model", '[[stages]]\nkind = "convert"\n')
    rec = load_recipe(p)
    assert rec.model == "someorg/some-model"
    assert [r.status for r in run_recipe(rec, dry_run=True)] == ["planned"] and fetched == []
    assert [r.status for r in run_recipe(rec)] == ["ran"]
    assert fetched[0][0] == "someorg/some-model" and "*.bin" not in fetched[0][1]
