"""ONNX export with KV cache: parity with PyTorch on the real stories260K, the manifest, and failure modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgepack[onnx]')")
pytest.importorskip("onnx", reason="needs onnx (pip install 'edgepack[onnx]')")

from edgepack.artifact import open_artifact  # noqa: E402
from edgepack.deploy.onnx_export import ExportConfig, export_onnx  # noqa: E402
from edgepack.errors import ArtifactError, ConfigError, UnsupportedOnTarget, ValidationFailed  # noqa: E402

FAST = ExportConfig(exporter="torchscript")  # ~10x quicker to export; the dynamo path has its own (slow) test


@pytest.fixture(scope="module")
def stories_onnx(stories, tmp_path_factory):
    return export_onnx(open_artifact(stories), FAST, None, tmp_path_factory.mktemp("exp") / "onnx")


def _torch_and_ort(stories, art):
    from edgepack.deploy.runtime import open_runtime

    return open_runtime(open_artifact(stories)), open_runtime(art)


def test_export_records_parity_within_1e4_and_64_identical_greedy_tokens(stories_onnx):
    m = stories_onnx.history[-1]["metrics"]
    assert stories_onnx.format == "onnx" and stories_onnx.history[-1]["stage"] == "export"
    assert m["max_abs_diff"] < 1e-4
    assert m["sqnr_db"] > 100
    assert m["greedy_tokens"] == 64 and m["greedy_agreement"] == 1.0 and m["greedy_first_divergence"] is None


def test_onnx_logits_and_greedy_text_match_pytorch_independently(stories, stories_onnx):
    """Not the stage's own probe: a real prompt, a 200-token forward, and 64 greedy tokens through the cache."""
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.hf import load_tokenizer

    ref_rt, ort_rt = _torch_and_ort(stories, stories_onnx)
    ids = np.random.default_rng(7).integers(3, 512, size=(2, 200))
    assert np.abs(ref_rt.forward_logits(ids) - ort_rt.forward_logits(ids)).max() < 1e-4
    prompt = [load_tokenizer(stories)("Once upon a time, a little girl named Lily")["input_ids"]]
    ref = generate(ref_rt, prompt, GenerationConfig(max_new_tokens=64)).tokens
    got = generate(ort_rt, prompt, GenerationConfig(max_new_tokens=64)).tokens
    assert got.shape == (1, 64)
    assert (ref == got).all()


def test_graph_interface_and_manifest(stories_onnx):
    import onnx

    g = onnx.load(str(stories_onnx.path / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    outputs = [o.name for o in g.output]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(inputs) == 3 + 2 * 5 and outputs[0] == "logits" and outputs[1:3] == ["present.0.key", "present.0.value"]
    batch, kv_heads, past, head_dim = inputs["past_key_values.4.value"]
    assert isinstance(batch, str) and isinstance(past, str) and (kv_heads, head_dim) == (4, 8)  # dynamic batch/past
    ex = stories_onnx.extra
    assert (ex["num_layers"], ex["num_kv_heads"], ex["head_dim"], ex["vocab_size"]) == (5, 4, 8, 512)
    assert ex["inputs"] == list(inputs) and ex["outputs"] == outputs and ex["made_by"] == "torch.onnx (torchscript)"
    for f in ("tokenizer.json", "config.json", "model.onnx"):
        assert f in stories_onnx.files
    on_disk = json.loads((stories_onnx.path / "edgepack.json").read_text())
    assert on_disk["history"][-1]["metrics"]["bytes"] == (stories_onnx.path / "model.onnx").stat().st_size


def test_failed_validation_is_a_failed_stage_and_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValidationFailed, match=r"logits differ from PyTorch by .* > atol 1e-12"):
        export_onnx(open_artifact(tiny_model), ExportConfig(exporter="torchscript", atol=1e-12, greedy_tokens=0),
                    None, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_target_without_onnxruntime_is_refused_before_any_weights_load(tmp_path):
    from edgepack.targets.profile import target_from_dict

    gpu_only = target_from_dict({"name": "trt-only", "device_type": "gpu", "arch": "x", "sm": 90, "memory_gib": 8,
                                 "usable_memory_gib": 7, "bandwidth_gb_s": 100, "precisions": ["fp16"],
                                 "runtimes": ["tensorrt"], "sources": {"memory": "t", "usable_memory": "t",
                                                                      "bandwidth": "t"}}, "test")
    from edgepack.artifact import Artifact

    never_loaded = Artifact(tmp_path / "no-such-model", {"format": "hf"}, False)  # loading it would fail loudly
    with pytest.raises(UnsupportedOnTarget, match="does not run onnxruntime"):
        export_onnx(never_loaded, FAST, gpu_only, tmp_path / "out")


def test_bad_config_and_wrong_source_format(stories_onnx, tmp_path):
    with pytest.raises(ConfigError, match="exporter must be one of dynamo, torchscript"):
        export_onnx(stories_onnx, ExportConfig(exporter="jit"), None, tmp_path / "x")
    with pytest.raises(ArtifactError, match="export reads Hugging Face checkpoints"):
        export_onnx(stories_onnx, FAST, None, tmp_path / "x")


def test_cli_export_onnx_json(tiny_model, tmp_path):
    from click.testing import CliRunner

    from edgepack.cli import cli

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_model), "-o", str(out), "--exporter", "torchscript",
                                 "--greedy-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["format"] == "onnx" and res["metrics"]["max_abs_diff"] < 1e-4 and res["metrics"]["greedy_tokens"] == 16
    again = CliRunner().invoke(cli, ["export", "onnx", str(tiny_model), "-o", str(out)])
    assert again.exit_code == 1 and "already exists and is not empty" in again.output and "--force" in again.output


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(stories, tmp_path):
    """The documented torch.onnx.export(dynamo=True) path (about 1-3 minutes on 2 cores)."""
    art = export_onnx(open_artifact(stories), ExportConfig(), None, tmp_path / "dyn")
    m = art.history[-1]["metrics"]
    assert art.extra["made_by"] == "torch.onnx (dynamo)"
    assert m["max_abs_diff"] < 1e-4 and m["greedy_agreement"] == 1.0 and m["greedy_tokens"] == 64
