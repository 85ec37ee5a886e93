"""The recipe runner: content-hashed outputs, resume after a crash, no work on a re-run, fan-out per target."""

from __future__ import annotations

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
    from edgepack.plan import embedded_path

    root = Path(__file__).resolve().parents[1]
    recipes = [embedded_path("demo.toml"), *sorted((root / "examples").glob("*.toml"))]
    for r in recipes:
        rec = load_recipe(r)
        assert rec.steps, r
