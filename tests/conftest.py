"""Shared fixtures: tiny Llama models built in-process from a config (fixed seed, no network), and the real
pretrained stories260K from ../shared when present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; EDGEPACK_SHARED points elsewhere (a GPU machine gets only the repository)
SHARED = Path(os.environ.get("EDGEPACK_SHARED") or ROOT.parent / "shared")
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories-valid-sample.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def make_tiny_llama(path: Path, seed: int = 0, **over) -> Path:
    """A random-weight Llama saved as a Hugging Face checkpoint with the stories260K tokenizer (vocab 512)."""
    import torch
    from transformers import LlamaForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**over)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    return path


def tiny_arch_config(arch: str, hidden: int = 64, **over):
    """A tiny config of one real transformers config class per architecture family the issue matrix covers (vocab
    512 for the stories260K tokenizer, 2 layers, head_dim 16 or 32)."""
    import transformers as tf

    c = dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    moe = dict(moe_intermediate_size=hidden, num_experts_per_tok=2)
    head = dict(head_dim=hidden // 4)
    make = {
        "llama": lambda: tf.LlamaConfig(**c),
        "qwen2": lambda: tf.Qwen2Config(**c),  # q/k/v biases: the DeepSeek-R1-Distill-Qwen layout
        "qwen3": lambda: tf.Qwen3Config(**c, **head),
        "mistral_sw": lambda: tf.MistralConfig(**c, sliding_window=8),  # Mistral 7B v0.1 slides a window
        "phi3": lambda: tf.Phi3Config(**c),  # fused qkv_proj and gate_up_proj
        "gemma2": lambda: tf.Gemma2Config(**c, **head, sliding_window=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, **head, sliding_window=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=512, n_embd=hidden, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=1, eos_token_id=2),
        "mixtral": lambda: tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**c, **moe, num_experts=4, shared_expert_intermediate_size=hidden),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**{**c, "num_key_value_heads": 4}, **moe, n_routed_experts=4,
                                                   n_shared_experts=1, kv_lora_rank=32, q_lora_rank=None,
                                                   qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                                   first_k_dense_replace=1),
    }[arch]()
    for k, v in over.items():
        setattr(make, k, v)
    return make


def make_tiny_arch(path: Path, arch: str, hidden: int = 64, seed: int = 0, **over) -> Path:
    """A random-weight checkpoint of tiny_arch_config(arch) with the stories260K tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_arch_config(arch, hidden, **over)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return STORIES


@pytest.fixture()
def stories_copy(stories, tmp_path) -> Path:
    """A private copy of stories260K at tmp_path / "art", for tests that damage or write around their input."""
    return Path(shutil.copytree(stories, tmp_path / "art"))


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    if not TINYSTORIES.is_file():
        pytest.skip(f"{TINYSTORIES} not found")
    return TINYSTORIES


@pytest.fixture(scope="session")
def embedded_text() -> Path:
    from edgepack.sources import embedded_path

    return embedded_path("tinystories-sample.txt")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package (pip install 'edgepack[tensorrt]')"))


def load_script(name: str):
    """A program from scripts/ as a module (scripts are not in the package): load_script("gpu_decode").main(...)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"edgepack_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
