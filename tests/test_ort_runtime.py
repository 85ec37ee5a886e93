"""The onnxruntime runtime: IO-bound pre-allocated cache vs plain session.run vs PyTorch, sampling determinism, stop
tokens, batch, cache limits, and perplexity of an ONNX artifact through `edgepack eval`'s scorer."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgepack[onnx]')")

from edgepack.artifact import open_artifact  # noqa: E402
from edgepack.deploy.generation import GenerationConfig, generate  # noqa: E402
from edgepack.deploy.runtime import open_runtime  # noqa: E402
from edgepack.errors import ArtifactError, ConfigError  # noqa: E402

PROMPT = np.array([[1, 403, 261, 426, 306, 267, 349]])  # BOS + "Once upon a time" in the stories260K vocab


@pytest.fixture(scope="module")
def onnx_art(stories, tmp_path_factory):
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx

    return export_onnx(open_artifact(stories), ExportConfig(exporter="torchscript", greedy_tokens=0), None,
                       tmp_path_factory.mktemp("ort") / "onnx")


@pytest.fixture(scope="module")
def runtimes(stories, onnx_art):
    return {"bound": open_runtime(onnx_art), "plain": open_runtime(onnx_art, io_binding=False),
            "torch": open_runtime(open_artifact(stories))}


def test_default_runtime_for_onnx_is_onnxruntime_with_threads(runtimes):
    d = runtimes["bound"].describe()
    assert d["runtime"] == "onnxruntime" and d["io_binding"] is True and d["threads"] >= 1
    assert runtimes["plain"].describe()["io_binding"] is False


def test_io_binding_cache_matches_plain_run_and_pytorch_step_by_step(runtimes):
    """Prefill + 20 decode steps: the ping-pong pre-allocated cache must give the plain path's logits bit for bit."""
    bound, plain, ref = runtimes["bound"], runtimes["plain"], runtimes["torch"]
    lb, lp, lr = bound.prefill(PROMPT), plain.prefill(PROMPT), ref.prefill(PROMPT)
    worst_vs_torch = np.abs(lb - lr).max()
    for _ in range(20):
        assert np.array_equal(lb, lp)
        nxt = lr.argmax(-1)
        lb, lp, lr = bound.decode_step(nxt), plain.decode_step(nxt), ref.decode_step(nxt)
        worst_vs_torch = max(worst_vs_torch, np.abs(lb - lr).max())
    assert worst_vs_torch < 1e-4
    assert bound.memory_report()["kv_cache_bytes"] == 2 * 10 * 1 * 4 * 512 * 8 * 4  # 2 buffers x 10 tensors, fp32


def test_sampling_is_deterministic_with_a_seed(runtimes):
    rt = runtimes["bound"]
    cfg = GenerationConfig(max_new_tokens=48, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a, b = generate(rt, PROMPT, cfg).tokens, generate(rt, PROMPT, cfg).tokens
    c = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48, temperature=1.0, top_k=50, top_p=0.95, seed=12)).tokens
    greedy = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48)).tokens
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.2  # another seed: mostly another text
    assert (a != greedy).any()
    top1 = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48, temperature=1.0, top_k=1, seed=5)).tokens
    assert np.array_equal(top1, greedy)  # top_k = 1 is greedy whatever the seed


def test_stop_token_and_max_tokens(runtimes):
    rt = runtimes["bound"]
    greedy = generate(rt, PROMPT, GenerationConfig(max_new_tokens=30)).tokens[0]
    stop_at = int(np.nonzero(greedy == greedy[5])[0][0])  # first position that token appears
    res = generate(rt, PROMPT, GenerationConfig(max_new_tokens=30, stop_token_ids=(int(greedy[5]),)))
    assert res.stopped == "stop_token" and res.tokens.shape[1] == stop_at + 1
    assert np.array_equal(res.tokens[0], greedy[:stop_at + 1])
    assert len(res.token_latencies_s) == stop_at and res.decode_tokens_per_s > 0


def test_batch_of_two_equals_two_single_runs(runtimes):
    rt = runtimes["bound"]
    other = np.array([[1, 403, 261, 426, 306, 267, 400]])
    both = generate(rt, np.concatenate([PROMPT, other]), GenerationConfig(max_new_tokens=16)).tokens
    assert np.array_equal(both[0], generate(rt, PROMPT, GenerationConfig(max_new_tokens=16)).tokens[0])
    assert np.array_equal(both[1], generate(rt, other, GenerationConfig(max_new_tokens=16)).tokens[0])


def test_cache_limit_is_a_clear_error(onnx_art):
    rt = open_runtime(onnx_art, max_length=12)
    with pytest.raises(ConfigError, match="reached 13 tokens, past this runtime's cache of 12"):
        generate(rt, PROMPT, GenerationConfig(max_new_tokens=10))


def test_onnx_perplexity_equals_pytorch(stories, onnx_art, tinystories_text):
    from edgepack.quality import PplProtocol, evaluate_artifact

    proto = PplProtocol(max_tokens=3000)
    ref = evaluate_artifact(open_artifact(stories), tinystories_text, proto)
    got = evaluate_artifact(onnx_art, tinystories_text, proto)
    assert got.tokens == ref.tokens == 3000
    assert abs(got.perplexity / ref.perplexity - 1) < 1e-5
    assert 2.5 < got.perplexity < 8  # a trained model, not noise (vocab 512)


def test_wrong_format_is_refused(stories):
    from edgepack.deploy.ort_runtime import open_ort_runtime

    with pytest.raises(ArtifactError, match="runs 'onnx' artifacts"):
        open_ort_runtime(open_artifact(stories))
