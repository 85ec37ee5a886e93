"""The onnxruntime-genai builder's option mapping (ours over the builder's), and what an int4 build with our defaults
writes: fp32 embedding, int8 lm_head, int4 body."""

from __future__ import annotations

import pytest

from edgepack.deploy.genai_builder import GENAI_INT4_DEFAULTS, builder_options
from edgepack.errors import ConfigError


def _as_dict(opts: list[str]) -> dict:
    return dict(o.split("=", 1) for o in opts)


def test_int4_defaults_keep_embedding_fp32_lm_head_int8_and_use_k_quant():
    opts = _as_dict(builder_options("int4", accuracy_level=4, block_size=32))
    assert opts == {"accuracy_level": "4", "block_size": "32", "op_types_to_quantize": "MatMul",
                    "algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"}


def test_overrides_replace_add_and_drop_keys_in_order():
    opts = builder_options("int4", 4, 128, ("algo_config=rtn", "matmul_mixed_precision=", "is_symmetric=false"))
    assert opts == ["accuracy_level=4", "block_size=128", "op_types_to_quantize=MatMul", "algo_config=rtn",
                    "is_symmetric=false"]
    # a value may itself hold '=' / ',' / ':' (only the first '=' splits)
    mixed = _as_dict(builder_options("int4", overrides=("matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",)))
    assert mixed["matmul_mixed_precision"] == "last_matmul:int8,mixed_layers:int8"


def test_builder_defaults_leaves_only_accuracy_and_block():
    opts = _as_dict(builder_options("int4", 0, 64, ("builder-defaults",)))
    assert opts == {"accuracy_level": "0", "block_size": "64"}
    assert not set(GENAI_INT4_DEFAULTS) & set(opts)
    # later overrides still apply after the reset
    assert _as_dict(builder_options("int4", overrides=("builder-defaults", "algo_config=k_quant")))["algo_config"] == "k_quant"


def test_bad_options_are_refused():
    assert builder_options("fp32") == []
    with pytest.raises(ConfigError, match="int4 only"):
        builder_options("fp32", overrides=("algo_config=rtn",))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        builder_options("int4", overrides=("k_quant",))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        builder_options("int4", overrides=("=rtn",))


@pytest.mark.slow
def test_int4_build_with_our_defaults_writes_fp32_embedding_and_int8_lm_head(tiny_model, tmp_path):
    """tiny_model has head_dim 16. Built through `compile`: the graph holds a plain fp32 Gather for the embedding,
    an 8-bit MatMulNBits for lm_head, 4-bit for every other linear, in blocks of group_size; the manifest records
    the options."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    import onnx

    from edgepack.artifact import open_artifact
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.targets import load_target

    art = compile_stage(open_artifact(tiny_model), CompileConfig(builder="genai", precision="int4", measure_tokens=0,
                                                                 group_size=16), load_target("cpu-x86-64"), tmp_path / "g4")
    graph = onnx.load(art.path / art.extra["onnx_file"], load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "GatherBlockQuantized" not in ops and "Gather" in ops
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    head = [k for k in bits if "lm_head" in k]
    assert len(head) == 1 and bits[head[0]] == 8
    assert len(bits) > 1 and all(b == 4 for k, b in bits.items() if k not in head)
    blocks = {next(a.i for a in n.attribute if a.name == "block_size") for n in graph.node if n.op_type == "MatMulNBits"}
    assert blocks == {16}  # group_size reaches the builder (its default is 32)
    assert _as_dict(art.extra["builder_options"]["extra_options"])["algo_config"] == "k_quant"
    assert art.history[-1]["config"]["genai_options"] == []  # asdict of the default () as stored in JSON
    assert art.history[-1]["metrics"]["sqnr_db"] > 10  # logits still close to PyTorch's on the probe


def test_refuses_models_with_a_decoder_matrix_as_wide_as_the_vocabulary():
    """The builder takes any Linear with out_features == vocab_size for lm_head: such a model must be refused."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    from edgepack.deploy.genai_builder import check_genai
    from edgepack.errors import UnsupportedOnTarget

    cfg = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 2,
           "vocab_size": 512}
    check_genai(cfg, "int4")  # fine: no width equals 512
    with pytest.raises(UnsupportedOnTarget, match="intermediate_size"):
        check_genai({**cfg, "intermediate_size": 512}, "int4")
    with pytest.raises(UnsupportedOnTarget, match="hidden_size"):
        check_genai({**cfg, "hidden_size": 512, "intermediate_size": 1024}, "fp32")


def test_auto_builder_falls_back_to_edgepack_when_genai_would_misread_lm_head(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    from conftest import make_tiny_llama

    from edgepack.artifact import open_artifact
    from edgepack.deploy.compile import CompileConfig, resolve_builder

    path = {"precision": "int4", "device": "cpu"}
    ok = open_artifact(make_tiny_llama(tmp_path / "ok"))  # head_dim 16, MLP 128, vocab 512
    assert resolve_builder(CompileConfig(), ok, path)[0] == "genai"
    bad = open_artifact(make_tiny_llama(tmp_path / "bad", intermediate_size=512))
    builder, why = resolve_builder(CompileConfig(), bad, path)
    assert builder == "edgepack" and "intermediate_size" in why


@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_k_quant_gives_the_builders_codes_bit_for_bit(monkeypatch, workers):
    """The builder runs through deploy/genai_run.py, whose k_quant works on row chunks (bounded memory, threads);
    codes, scales and zero points must be exactly onnxruntime's own whole-tensor result."""
    import numpy as np

    wo = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")
    from edgepack.deploy import genai_run

    monkeypatch.setattr(genai_run, "CHUNK_GROUPS", 40)  # 7 rows of 192 per chunk: uneven last chunk
    monkeypatch.setattr(wo, "quant_tensor_k_quant_cpu", wo.quant_tensor_k_quant_cpu)  # restored after the test
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((192, 50)) * 0.02).astype(np.float32)
    for bits in (4, 8):
        ref = wo.quant_tensor_k_quant_cpu(w.T, bits, 32)
        got = genai_run.chunked_k_quant(wo.quant_tensor_k_quant_cpu, workers)(w.T, bits, 32)
        np.testing.assert_array_equal(got[0], ref[0].astype(np.uint8))  # the caller's cast, done per chunk
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[2], ref[2])
    assert genai_run.patch_k_quant() and wo.quant_tensor_k_quant_cpu.__name__ == "run"
    assert not genai_run.patch_k_quant()  # never wrapped twice
