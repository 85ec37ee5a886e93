"""Distillation: the loss and schedules by the numbers, tokenizer mismatch, exact resume after an interruption,
healing of a depth-pruned stories260K, and the CLI chain prune -> distill with its manifest."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgepack.compress.distill import DistillConfig, distill_loss, train  # noqa: E402


def test_loss_is_ce_plus_scaled_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    ce_only, ce, kl = distill_loss(s, t, ids, 1.0, 2.0)
    assert float(ce_only) == pytest.approx(float(torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11),
                                                                                   ids[:, 1:].reshape(-1))))
    loss, ce, kl = distill_loss(s, t, ids, 0.25, 2.0)
    p = torch.softmax(t[:, :-1] / 2, -1)
    manual_kl = float((p * (p.log() - torch.log_softmax(s[:, :-1] / 2, -1))).sum(-1).mean())
    assert float(kl) == pytest.approx(manual_kl, rel=1e-5)
    assert float(loss) == pytest.approx(0.25 * float(ce) + 0.75 * 4.0 * manual_kl, rel=1e-5)
    assert float(distill_loss(s, s.clone(), ids, 0.0, 3.0)[2]) == pytest.approx(0.0, abs=1e-6)


def test_schedules():
    cfg = DistillConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1, alpha=0.7, alpha_end=0.3)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert cfg.lr_at(110) == pytest.approx(1e-4)
    assert cfg.alpha_at(0) == pytest.approx(0.7) and cfg.alpha_at(55) == pytest.approx(0.5)
    assert cfg.alpha_at(110) == pytest.approx(0.3)
    assert DistillConfig(alpha=0.4).alpha_at(99) == 0.4 and not DistillConfig(alpha=1.0).uses_teacher()


def test_config_errors_all_at_once():
    from edgepack.config import build_config
    from edgepack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_config(DistillConfig, {"alpha": 1.5, "teacher_cache": "disk", "batch_size": 0}, "distill")
    msg = e.value.one_line()
    assert "alpha must be in [0, 1]" in msg and "teacher_cache" in msg and "batch_size must be >= 1" in msg


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, embedded_text):
    from conftest import make_tiny_llama

    from edgepack.artifact import open_artifact
    from edgepack.compress.distill import distill
    from edgepack.errors import ConfigError

    teacher = make_tiny_llama(tmp_path / "t")
    student = make_tiny_llama(tmp_path / "s", vocab_size=600)
    cfg = DistillConfig(data=str(embedded_text), teacher=str(teacher), steps=1)
    with pytest.raises(ConfigError, match="do not share a tokenizer"):
        distill(open_artifact(student), cfg, None, tmp_path / "out", show_progress=False)


def _tiny_pair(tmp_path):
    from conftest import make_tiny_llama

    from edgepack.hf import load_model

    teacher = load_model(make_tiny_llama(tmp_path / "t", seed=1), device="cpu")
    return teacher, lambda: load_model(make_tiny_llama(tmp_path / "s", seed=2, num_hidden_layers=1), device="cpu")


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    teacher, fresh_student = _tiny_pair(tmp_path)
    chunks = torch.randint(3, 512, (24, 32))
    cfg = DistillConfig(steps=6, batch_size=4, checkpoint_every=3, eval_every=100, patience=0, lr=1e-2)
    calls = itertools.count()
    eval_fn = lambda m: -float(next(calls))  # noqa: E731  (every evaluation "improves": the last weights are kept)

    ref = fresh_student()
    train(ref, teacher, chunks, eval_fn, cfg)

    class Killed(Exception):
        pass

    def kill_at_4(step, _total):
        if step == 4:
            raise Killed

    ckpt = tmp_path / "ck.pt"
    with pytest.raises(Killed):
        train(fresh_student(), teacher, chunks, eval_fn, cfg, ckpt, on_step=kill_at_4)
    resumed = fresh_student()
    run = train(resumed, teacher, chunks, eval_fn, cfg, ckpt)
    assert run["resumed_from"] == 3 and run["step"] == 6
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_distillation_heals_a_depth_pruned_stories(stories, tinystories_text):
    from edgepack.compress import prune_algos as pa
    from edgepack.compress.prune import chunk, heldout_perplexity, split_stream
    from edgepack.hf import load_model, load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(stories)
    train_ids, held, _ = split_stream(tok, tinystories_text, 0.1)
    teacher = load_model(stories, device="cpu")
    student = pa.drop_layers(teacher, [2])
    ppl = lambda m: heldout_perplexity(m.eval(), tok, held, 1024).perplexity  # noqa: E731
    t_ppl, start = ppl(teacher), ppl(student)
    cfg = DistillConfig(steps=30, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=5, eval_every=10, patience=0,
                        alpha=0.3)
    run = train(student, teacher, chunk(train_ids, 128, 16384), ppl, cfg)
    end = ppl(student)
    assert start / t_ppl > 1.8  # removing a layer hurts ...
    assert end < start * 0.8 and end == pytest.approx(run["best_ppl"], rel=1e-6)  # ... and 30 steps heal (0.76x)


def test_cli_student_from_prune_chains_prune_and_distill(tmp_path, embedded_text):
    from click.testing import CliRunner
    from conftest import make_tiny_llama

    from edgepack.artifact import open_artifact
    from edgepack.cli import cli

    teacher = make_tiny_llama(tmp_path / "t")
    out = tmp_path / "student"
    res = CliRunner().invoke(cli, ["distill", str(teacher), "--student-from-prune", "width:0.25", "--data",
                                   str(embedded_text), "-o", str(out), "--steps", "4", "--batch-size", "2",
                                   "--seq-len", "64", "--eval-every", "2", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output.strip().splitlines()[-1])["metrics"]
    art = open_artifact(out)
    assert [r["stage"] for r in art.history] == ["prune", "distill"]
    assert art.history[0]["metrics"]["intermediate_size"] == [128, 96]
    assert m["steps"] == 4 and m["ppl_after"] <= m["ppl_before"] and m["teacher_ppl"] > 0 and m["kl_to_teacher"] > 0
    assert not (tmp_path / ".student.ckpt").exists()  # checkpoints are cleaned once the artifact is committed
    res = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(embedded_text), "-o", str(tmp_path / "z")])
    assert res.exit_code == 1 and "give exactly one of --student and --student-from-prune" in res.output


def test_recipe_chains_prune_then_distill_with_the_base_model_as_teacher(tmp_path, tiny_model, embedded_text):
    from edgepack.artifact import open_artifact
    from edgepack.plan import load_recipe, run_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[recipe]
model = "{tiny_model}"
targets = ["cpu-x86-64"]
workdir = "{tmp_path / 'runs'}"
[[stages]]
kind = "prune"
method = "width"
sparsity = 0.5
calib = "{embedded_text}"
calib_tokens = 512
seq_len = 64
eval_max_tokens = 256
[[stages]]
kind = "distill"
data = "{embedded_text}"
steps = 3
batch_size = 2
seq_len = 64
eval_every = 3
eval_max_tokens = 256
""")
    results = run_recipe(load_recipe(recipe))
    assert [r.kind for r in results] == ["prune", "distill"]
    art = open_artifact(results[-1].path)
    m = art.history[-1]["metrics"]
    assert Path(m["teacher"]).resolve() == Path(tiny_model).resolve()
    assert m["steps"] == 3 and m["ppl_after"] <= m["ppl_before"]
    assert art.history[0]["metrics"]["intermediate_size"] == [128, 64]
