"""int4-gptq-kd (compress/quant_refine.py): GPTQ codes refined by distillation. On a tiny model it must lower the
quantized model's output error against GPTQ's on text it never saw, write ordinary int4 codes / scales / integer
zeros, be deterministic for a seed, run through both artifact paths; on stories260K it must reach the issue's bar."""

from __future__ import annotations

import pytest

from edgepack.artifact import open_artifact
from edgepack.compress.quantize import QuantizeConfig, quantize
from edgepack.targets import load_target

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_thread():
    """Many small ops: one thread is faster than two fighting over a shared 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_llama

    return open_artifact(make_tiny_llama(tmp_path_factory.mktemp("kd") / "m", intermediate_size=172))


def _windows(embedded_text, n: int, seq_len: int, start: int = 0):
    from edgepack.compress.quant_algos import calibration_ids
    from edgepack.hf import load_tokenizer
    from edgepack.sources import embedded_path

    tok = load_tokenizer(embedded_path("stories260K"))
    return calibration_ids(tok, embedded_text.read_text()[start:], n, seq_len, tok.bos_token_id)


def _kl(model, ref, ids) -> float:
    from edgepack.compress.quant_refine import _kl, _logits

    with torch.no_grad():
        return float(_kl(_logits(model, ids), _logits(ref, ids)))


def test_refinement_beats_gptq_on_unseen_text(stories, embedded_text):
    """On stories260K (a real 260K-parameter model: a random one gives distillation no signal): the refined model's
    next-token distributions are closer to fp32's than GPTQ's on windows neither saw. Measured: KL 0.060 (GPTQ)
    -> 0.040 (0.67x) with 112 training windows of 64 tokens, 200 steps, ~12 s."""
    from edgepack.compress.quant_algos import gptq_model_
    from edgepack.compress.quant_refine import gptq_kd_model_
    from edgepack.hf import load_model

    src = open_artifact(stories)
    calib = _windows(embedded_text, 120, 64)
    held_out = _windows(embedded_text, 8, 64, start=len(embedded_text.read_text()) // 2)  # calib ends near 1/3
    ref, g, r = (load_model(src, device="cpu", dtype=torch.float32) for _ in range(3))
    gptq_model_(g, calib[:16], 4, 32)
    codes, info = gptq_kd_model_(r, calib, 4, 32, gptq_samples=16, steps=200, lr=0.01, eval_every=20)
    kl_gptq, kl_kd = _kl(g, ref, held_out), _kl(r, ref, held_out)
    assert info["kd_val_kl"] < 0.9 * info["kd_val_kl_gptq"] and info["kd_best_step"] > 0
    assert kl_kd < 0.8 * kl_gptq, (kl_kd, kl_gptq)
    # ordinary int4 weights: codes in [0, 15], integer zeros, short last group padded with the zero point,
    # and the model holds exactly their dequantized values
    qw = codes["model.layers.0.mlp.down_proj"]
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15 and qw.scales.shape == (qw.codes.shape[0], 6)
    assert torch.equal(qw.zeros, torch.round(qw.zeros))
    assert torch.equal(qw.codes[:, 172:].float(), qw.zeros[:, 5:6].expand(-1, 20))  # stories260K's MLP is 172 wide
    assert torch.equal(qw.dequantize(), r.get_parameter("model.layers.0.mlp.down_proj.weight"))


def test_deterministic_for_a_seed(tiny, embedded_text):
    from edgepack.compress.quant_refine import gptq_kd_model_
    from edgepack.hf import load_model

    calib = _windows(embedded_text, 12, 32)
    runs = []
    for seed in (0, 0):
        m = load_model(tiny, device="cpu", dtype=torch.float32)
        runs.append(gptq_kd_model_(m, calib, 4, 32, gptq_samples=8, steps=8, lr=0.02, eval_every=2, seed=seed)[0])
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(runs[0][name].codes, runs[1][name].codes) and torch.equal(runs[0][name].scales, runs[1][name].scales)
    # kd_steps = 0 is plain GPTQ
    m = load_model(tiny, device="cpu", dtype=torch.float32)
    codes, info = gptq_kd_model_(m, calib, 4, 32, gptq_samples=8, steps=0)
    assert info["kd_best_step"] == 0 and info["kd_val_kl"] == info["kd_val_kl_gptq"]


def test_stage_both_formats(tiny, tmp_path):
    """The stage writes the refined codes on both paths; MatMulNBits at fp32 compute reproduces the torch path."""
    pytest.importorskip("onnxruntime")
    common = dict(method="int4-gptq-kd", group_size=32, eval_max_tokens=256, calib_samples=8, calib_seq_len=64,
                  kd_samples=16, kd_steps=10, exporter="torchscript")
    t = quantize(tiny, QuantizeConfig(format="torch", **common), None, tmp_path / "t")
    o = quantize(tiny, QuantizeConfig(format="onnx", accuracy_level=1, **common), load_target("cpu-x86-64"), tmp_path / "o")
    mt, mo = t.history[-1]["metrics"], o.history[-1]["metrics"]
    assert mt["method"] == "int4-gptq-kd" and mt["layers_quantized"] == 14 and mt["kd_train_windows"] == 12
    assert mt["kd_val_kl"] <= mt["kd_val_kl_gptq"] and t.history[-1]["config"]["kd_steps"] == 10
    assert abs(mo["ppl_after"] / mt["ppl_after"] - 1) < 1e-4  # the same codes run in both


@pytest.mark.slow
def test_stories_int4_bar(stories, tinystories_text, tmp_path):
    """The issue's bar: INT4 group 32 within 5 % of fp32 perplexity (edgepack-ppl-v1, calibration on the first 90 %
    of the TinyStories sample, the held-out rest scored). Measured: int4-gptq +5.41 %, int4-gptq-kd +3.33 % (seed 0; 85 s on one thread)."""
    art = quantize(open_artifact(stories), QuantizeConfig(method="int4-gptq-kd", format="torch", group_size=32,
                                                          calib=str(tinystories_text)), None, tmp_path / "kd")
    m = art.history[-1]["metrics"]
    assert m["eval_tokens"] > 20000 and m["ppl_increase_pct"] <= 5.0


def test_cli_takes_threads_and_shows_distillation_progress(tiny, tmp_path):
    """`quantize --threads N` sets torch's threads for the stage (recorded in its config); int4-gptq-kd reports its
    distillation steps on stderr as they go, and stdout stays one JSON object."""
    import json

    from click.testing import CliRunner

    from edgepack.cli import cli

    torch.set_num_threads(2)
    res = CliRunner().invoke(cli, ["quantize", str(tiny.path), "-m", "int4-gptq-kd", "--format", "torch",
                                   "--threads", "1", "--kd-steps", "4", "--calib-samples", "8",
                                   "--calib-seq-len", "64", "--eval-max-tokens", "256", "-o", str(tmp_path / "q"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 1
    assert "int4-gptq-kd: GPTQ, then 4 distillation steps: started" in res.stderr and "4/4" in res.stderr
    assert json.loads(res.stdout.strip())["metrics"]["kd_best_step"] >= 0
    assert open_artifact(tmp_path / "q").history[-1]["config"]["threads"] == 1
