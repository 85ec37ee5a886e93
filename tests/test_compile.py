"""compile: the runtime / precision choice per target profile, refusals with the way out, and a compiled artifact
that `edgepack generate` runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgepack[onnx]')")

from edgepack.artifact import open_artifact  # noqa: E402
from edgepack.deploy import compile as comp  # noqa: E402
from edgepack.deploy.compile import CompileConfig, choose_path, compile_stage  # noqa: E402
from edgepack.errors import ConfigError, MissingDependency, UnsupportedOnTarget  # noqa: E402
from edgepack.targets import load_target  # noqa: E402
from edgepack.targets.profile import target_from_dict  # noqa: E402

CPU = load_target("cpu-x86-64")


def _cpu_target(precisions):
    return target_from_dict({"name": "cpu-test", "device_type": "cpu", "arch": "x86-64", "memory_gib": 8,
                             "usable_memory_gib": 6, "bandwidth_gb_s": 20, "precisions": precisions,
                             "runtimes": ["onnxruntime"], "sources": {"memory": "t", "usable_memory": "t",
                                                                      "bandwidth": "t"}}, "test")


def test_cpu_default_is_int4_when_the_quantize_onnx_path_exists(monkeypatch):
    monkeypatch.setattr(comp, "onnx_quantize_available", lambda: True)
    assert choose_path(CompileConfig(), CPU) == {"runtime": "onnxruntime", "precision": "int4", "device": "cpu", "note": ""}
    assert choose_path(CompileConfig(), _cpu_target(["fp32", "int8"]))["precision"] == "int8"
    assert choose_path(CompileConfig(precision="fp32"), CPU)["precision"] == "fp32"


def test_cpu_default_falls_back_to_fp32_and_says_why(monkeypatch):
    monkeypatch.setattr(comp, "onnx_quantize_available", lambda: False)
    path = choose_path(CompileConfig(), CPU)
    assert (path["runtime"], path["precision"]) == ("onnxruntime", "fp32")
    assert "int4 not applied" in path["note"] and "quantize" in path["note"]
    with pytest.raises(ConfigError, match="int4 needs the quantize stage's ONNX path"):
        choose_path(CompileConfig(precision="int4"), CPU)


def test_gpu_targets_go_to_the_gpu_runtimes_and_onnxruntime_there_needs_its_cuda_build():
    h100 = load_target("h100-sxm")
    assert choose_path(CompileConfig(), h100)["runtime"] in ("torch-cuda", "tensorrt")  # tests/test_gpu_runtimes.py
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MissingDependency, match="onnxruntime-gpu") as exc:
            choose_path(CompileConfig(runtime="onnxruntime"), h100)
        # the 'onnx' extra is the CPU build: the hint must not send the user there
        assert "edgepack[onnx]" not in exc.value.hint and "pip install onnxruntime-gpu" in exc.value.hint


def test_precision_and_runtime_the_target_lacks_are_refused():
    with pytest.raises(UnsupportedOnTarget, match="cannot run int4"):
        choose_path(CompileConfig(precision="int4"), _cpu_target(["fp32"]))
    with pytest.raises(UnsupportedOnTarget, match="does not run 'tensorrt'"):
        choose_path(CompileConfig(runtime="tensorrt"), CPU)
    with pytest.raises(ConfigError, match="compile needs a target"):
        choose_path(CompileConfig(), None)


@pytest.fixture(scope="module")
def compiled(stories, tmp_path_factory):
    """stories260K exported (torchscript, fast) then compiled for the CPU as it is (fp32 ONNX source)."""
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx

    d = tmp_path_factory.mktemp("comp")
    onnx_art = export_onnx(open_artifact(stories), ExportConfig(exporter="torchscript", greedy_tokens=0), None, d / "onnx")
    return compile_stage(onnx_art, CompileConfig(measure_tokens=24), CPU, d / "cpu")


def test_compiled_artifact_records_runtime_precision_and_speed(compiled):
    ex, rec = compiled.extra, compiled.history[-1]
    assert compiled.format == "onnx" and (ex["runtime"], ex["precision"], ex["device"], ex["target"]) == (
        "onnxruntime", "fp32", "cpu", "cpu-x86-64")
    assert [h["stage"] for h in compiled.history] == ["export", "compile"]
    assert rec["metrics"]["measured_tokens"] == 24 and rec["metrics"]["decode_tokens_per_s"] > 1
    compiled.verify()  # every file linked in is listed with its sha256


def test_compiling_an_onnx_artifact_cannot_requantize_it(compiled, tmp_path):
    with pytest.raises(ConfigError, match="already fp32; compile cannot re-quantize it to int4"):
        compile_stage(compiled, CompileConfig(precision="int4"), CPU, tmp_path / "x")


def test_generate_cli_on_compiled_artifact_matches_pytorch_greedy(stories, compiled):
    from click.testing import CliRunner

    from edgepack.cli import cli
    from edgepack.deploy.runtime import open_runtime
    from edgepack.hf import load_tokenizer

    r = CliRunner().invoke(cli, ["generate", str(compiled.path), "--prompt", "Once upon a time", "--max-new-tokens",
                                 "24", "--ignore-eos", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    ids = [load_tokenizer(stories)("Once upon a time")["input_ids"]]
    from edgepack.deploy.generation import GenerationConfig, generate

    ref = generate(open_runtime(open_artifact(stories)), ids, GenerationConfig(max_new_tokens=24)).tokens[0]
    assert res["tokens"] == ref.tolist() and res["runtime"] == "onnxruntime" and res["new_tokens"] == 24
    assert res["text"] and res["decode_tokens_per_s"] > 0
    text = CliRunner().invoke(cli, ["generate", str(compiled.path), "--prompt", "Once upon a time",
                                    "--max-new-tokens", "8", "--temperature", "0.9", "--seed", "3"])
    assert text.exit_code == 0 and text.output.startswith("Once upon a time")


def test_compile_cli_refuses_onnx_source_for_torch_cuda_in_one_line(compiled, tmp_path):
    from click.testing import CliRunner

    from edgepack.cli import cli

    r = CliRunner().invoke(cli, ["compile", str(compiled.path), "--target", "h100-sxm", "--runtime", "torch-cuda",
                                 "-o", str(tmp_path / "g")])
    assert r.exit_code == 1 and r.output.startswith("error: torch-cuda runs Hugging Face checkpoints")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_compile_hf_for_cpu_defaults_to_int4_matmulnbits(stories, tmp_path):
    if not comp.onnx_quantize_available():
        pytest.skip("the quantize stage's ONNX path (compress/quant_onnx.py) is not installed")
    import onnx

    art = compile_stage(open_artifact(stories), CompileConfig(exporter="torchscript", measure_tokens=16), CPU,
                        tmp_path / "int4")
    assert (art.extra["precision"], art.extra["runtime"], art.extra["made_by"]) == (
        "int4", "onnxruntime", "torch.onnx (torchscript)")
    assert [h["stage"] for h in art.history] == ["quantize", "compile"]
    ops = [n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 5 * 7  # every decoder linear; lm_head stays fp32
    q = art.history[0]["metrics"]
    assert q["ppl_increase_pct"] < 20 and q["sqnr_db"] > 15  # measured: +10.0 %, 22.8 dB (int4-rtn, block 32)
    assert art.history[-1]["metrics"]["decode_tokens_per_s"] > 1


def test_genai_builder_refuses_head_dim_not_multiple_of_16(stories, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    with pytest.raises(UnsupportedOnTarget, match="multiple of 16; this model's is 8"):
        compile_stage(open_artifact(stories), CompileConfig(builder="genai"), CPU, tmp_path / "g")
    with pytest.raises(ConfigError, match="does not write int8"):
        compile_stage(open_artifact(stories), CompileConfig(builder="genai", precision="int8"), CPU, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_genai_builder_fp32_matches_pytorch_and_records_its_path(tiny_model, tmp_path):
    """tiny_model has head_dim 16. The builder's fp32 graph must equal PyTorch; int4 is its default on a CPU."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime

    assert choose_path(CompileConfig(builder="genai"), CPU)["precision"] == "int4"
    art = compile_stage(open_artifact(tiny_model), CompileConfig(builder="genai", precision="fp32", measure_tokens=8),
                        CPU, tmp_path / "g32")
    m = art.history[-1]["metrics"]
    assert art.extra["made_by"].startswith("onnxruntime-genai builder") and m["max_abs_diff"] < 1e-4
    assert "genai_config.json" in art.files
    prompt = np.array([[1, 403, 261, 426, 306]])
    rt = open_runtime(art)
    assert rt.describe()["shared_kv_buffer"] is True  # GQA writes into the one pre-allocated cache in place
    a = generate(rt, prompt, GenerationConfig(max_new_tokens=16)).tokens
    b = generate(open_runtime(open_artifact(tiny_model)), prompt, GenerationConfig(max_new_tokens=16)).tokens
    assert np.array_equal(a, b)


def test_auto_builder_takes_genai_for_cpu_int4_only_where_it_can_build(stories, tiny_model):
    from edgepack.deploy.compile import resolve_builder

    cpu_int4 = {"runtime": "onnxruntime", "precision": "int4", "device": "cpu", "note": ""}
    b, why = resolve_builder(CompileConfig(), open_artifact(stories), cpu_int4)
    assert b == "edgepack" and "head_dim 8 is not a multiple of 16" in why
    assert resolve_builder(CompileConfig(), open_artifact(tiny_model), {**cpu_int4, "precision": "fp32"})[0] == "edgepack"
    assert resolve_builder(CompileConfig(builder="edgepack"), open_artifact(tiny_model), cpu_int4) == ("edgepack", "asked for")
    import importlib.util

    expected = "genai" if importlib.util.find_spec("onnxruntime_genai") else "edgepack"
    assert resolve_builder(CompileConfig(), open_artifact(tiny_model), cpu_int4)[0] == expected


def test_a_wrongly_wired_built_graph_fails_the_stage():
    """Graphs built outside our export are checked against PyTorch: a 3 dB int4 graph (genai wiring a vocab-wide
    decoder matrix as lm_head) is a failed stage, a plainly quantized one (25 dB) passes with its floor recorded."""
    from edgepack.deploy.compile import check_parity
    from edgepack.errors import ValidationFailed

    ok = check_parity({"sqnr_db": 25.3, "max_abs_diff": 1.0, "argmax_agreement": 0.8}, "int4")
    assert ok["min_sqnr_db"] == 5.0 and ok["sqnr_db"] == 25.3
    with pytest.raises(ValidationFailed, match="3.3 dB SQNR from the PyTorch model"):
        check_parity({"sqnr_db": 3.3, "max_abs_diff": 9.0, "argmax_agreement": 0.1}, "int4")
    with pytest.raises(ValidationFailed):
        check_parity({"sqnr_db": 33.0, "max_abs_diff": 1.0, "argmax_agreement": 0.9}, "fp32")
