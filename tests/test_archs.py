"""Architecture x stage (issue 19): tiny random-weight models of the real transformers config classes (Llama, Qwen2
with biases, Qwen3, Mistral with a sliding window, Phi-3, Gemma 2 / 3, GPT-2, Mixtral, Qwen2-MoE, DeepSeek-V2) go
through a stage, or the stage refuses them up front in one line naming the architecture and the stage."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_arch

from edgepack.artifact import open_artifact

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgepack[onnx]')")


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    made = {}
    root = tmp_path_factory.mktemp("archs")

    def get(arch: str, hidden: int = 64):
        if (arch, hidden) not in made:
            made[arch, hidden] = make_tiny_arch(root / f"{arch}-{hidden}", arch, hidden)
        return made[arch, hidden]

    return get


@pytest.mark.parametrize("arch", ["mistral_sw", "gemma2"])
def test_sliding_window_onnx_runs_past_the_window(arch, arch_dir, tmp_path):
    """Window 8: the export's own greedy check (8 prompt + 24 tokens) and a 40-token decode through the cache both
    pass the window and match PyTorch token for token (before: the graph trimmed its present tensors to the window
    and onnxruntime failed in a Slice node)."""
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx
    from edgepack.deploy.runtime import open_runtime

    src = open_artifact(arch_dir(arch))
    art = export_onnx(src, ExportConfig(exporter="torchscript", greedy_tokens=24), None, tmp_path / "onnx")
    m = art.history[-1]["metrics"]
    assert m["greedy_agreement"] == 1.0 and m["sqnr_db"] > 60
    prompt = np.array([[1, 403, 261, 426, 306, 22, 97, 45, 300, 11]])
    gen = GenerationConfig(max_new_tokens=40)
    got = generate(open_runtime(art), prompt, gen).tokens
    ref = generate(open_runtime(src), prompt, gen).tokens
    assert got.shape == (1, 40) and np.array_equal(got, ref)


@pytest.mark.slow
def test_compile_auto_falls_back_to_our_export_when_the_genai_builder_fails(arch_dir, tmp_path):
    """onnxruntime-genai 0.18's builder fails on a Phi-3 checkpoint (KeyError 'multi_cache'): `auto` says so and
    builds our export + MatMulNBits instead, whose logits pass the gate against PyTorch; asked for by name, the
    genai builder's failure stays the stage's error."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.errors import ValidationFailed
    from edgepack.targets import load_target

    src, cpu = open_artifact(arch_dir("phi3")), load_target("cpu-x86-64")
    art = compile_stage(src, CompileConfig(exporter="torchscript", measure_tokens=4), cpu, tmp_path / "auto")
    m = art.history[-1]["metrics"]
    assert (m["builder"], art.extra["precision"], art.extra["made_by"]) == ("edgepack", "int4", "torch.onnx (torchscript)")
    assert "onnxruntime-genai builder failed on this phi3 model" in m["builder_fallback"] == m["builder_reason"]
    assert m["sqnr_db"] >= m["min_sqnr_db"] == 5.0 and m["argmax_agreement"] > 0.5
    with pytest.raises(ValidationFailed, match="onnxruntime-genai builder failed"):
        compile_stage(src, CompileConfig(builder="genai", measure_tokens=0), cpu, tmp_path / "genai")
    assert not (tmp_path / "genai").exists()
