"""Stage `gguf` / `edgepack export gguf`: a GGUF file for llama.cpp, holding the codes our quantize stage measured.

    export_gguf(src, GgufConfig(), target, out) -> Artifact   # format "gguf": model.gguf + tokenizer + config.json

Sources: a `torch-quant` artifact (`edgepack quantize --format torch`), whose integer codes are written as they are
wherever a GGUF block type holds them exactly, or a Hugging Face checkpoint (float weights, quantized here by the
`gguf` package's reference quantizers, which are llama.cpp's). Written with ggml-org's `gguf` package (extra
`gguf`); architectures `llama` and `qwen2` (q/k/v bias).

Which GGUF type holds which of our codes (ggml blocks are 32 input channels with fp16 scales):
    int4, symmetric (zero 8), group a multiple of 32   -> Q4_0  w = (q - 8) d           our codes, d = fp16(scale)
    int4, asymmetric or float zero (HQQ), group k*32   -> Q4_1  w = q d + m            our codes, d = fp16(s), m = fp16(-z s)
    int8 per channel (symmetric)                       -> Q8_0  w = q d                our codes, d = fp16(row scale)
    anything else (group 16, width not a multiple of 32) -> the nearest type that holds it (Q8_0 of the dequantized
                                                         weight, or F32 where the width is not a multiple of 32): said
                                                         per tensor in the manifest (`tensors`, `source`)
The only change to our weights is the scale's (and Q4_1's offset's) rounding to fp16, which llama.cpp's own
quantizers also do: at most 8 / 30 / 128 x 2^-11 of a quantization step for Q4_0 / Q4_1 / Q8_0 (recorded:
`max_err_steps`). Before committing, the stage reads the file back with the `gguf` package, dequantizes every tensor
with its reference code and compares it with our weights tensor by tensor (ValidationFailed past half a step).

The embedding and lm_head (kept fp32 by our quantize stage) are written as `head_type` (default q8_0: llama.cpp's
Q4_0 files keep the output matrix at 6-8 bits too; at a 151,936-token vocabulary an fp32 head is 544 MB read per
token). Norms and biases stay F32 (ggml needs them so). For the `llama` architecture q_proj / k_proj rows are
permuted as llama.cpp's convert_hf_to_gguf.py does (its rope is interleaved, transformers' is rotate-half); the
permutation moves whole rows, so codes, scales and zeros move with them unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, stage_record
from edgepack.errors import ArtifactError, ConfigError, ValidationFailed, require

GGUF_FILE = "model.gguf"
ARCHS = {"llama": "llama", "qwen2": "qwen2"}  # config.json model_type -> GGUF architecture
FLOAT_TYPES = ("f32", "f16", "q8_0", "q4_0")  # what a float (hf) source can be written as
HEAD_TYPES = ("q8_0", "f16", "f32")
QK = 32  # ggml block width of Q4_0 / Q4_1 / Q8_0 (input channels)
# HF linear name inside a decoder layer -> GGUF tensor name (llama.cpp's tensor_mapping.py)
LAYER_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
MAX_ERR_STEPS = 0.5  # read-back check: a wrong code is off by >= ~1 step; fp16 scale rounding by <= 0.07


@dataclass(frozen=True)
class GgufConfig:
    # float (hf) sources: f32 | f16 | q8_0 | q4_0 (llama.cpp's reference quantizers); a torch-quant source writes its
    # own codes and takes no type ("auto")
    type: str = field(default="auto", metadata={"choices": ("auto", *FLOAT_TYPES)})
    head_type: str = field(default="q8_0", metadata={"choices": HEAD_TYPES})  # token_embd and output (lm_head)

    def validate(self) -> list[str]:
        errs = []
        if self.type not in ("auto", *FLOAT_TYPES):
            errs.append(f"type must be auto or one of {', '.join(FLOAT_TYPES)}")
        if self.head_type not in HEAD_TYPES:
            errs.append(f"head_type must be one of {', '.join(HEAD_TYPES)}")
        return errs


# ----------------------------------------------------------------------------------------------- block packing
def _f16_bytes(x, n: int, nb: int):
    import numpy as np

    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(n, nb, 2)


def _block_params(per_group, group_size: int, nb: int):
    """[N, groups] per-group values -> [N, nb] per 32-wide ggml block (a group of k*32 spans k blocks)."""
    import numpy as np

    return np.repeat(per_group, group_size // QK, axis=1)[:, :nb]


def pack_q4(codes, scales, zeros, group_size: int, in_features: int, symmetric: bool):
    """Our 4-bit codes [N, >= K] (values 0..15) -> Q4_0 (symmetric) or Q4_1 block bytes [N, K/32 * (18|20)]."""
    import numpy as np

    n, nb = codes.shape[0], in_features // QK
    c = np.asarray(codes[:, :in_features], dtype=np.uint8).reshape(n, nb, QK)
    qs = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)  # element j low nibble, j + 16 high nibble
    s = _block_params(np.asarray(scales, dtype=np.float32), group_size, nb)
    if symmetric:
        parts = [_f16_bytes(s, n, nb), qs]
    else:
        z = _block_params(np.asarray(zeros, dtype=np.float32), group_size, nb)
        parts = [_f16_bytes(s, n, nb), _f16_bytes(-z * s, n, nb), qs]
    return np.concatenate(parts, axis=2).reshape(n, -1)


def pack_q8(codes, scales, in_features: int):
    """Our symmetric per-channel int8 codes [N, >= K] (zero 128), scales [N, 1] -> Q8_0 block bytes [N, K/32 * 34]."""
    import numpy as np

    n, nb = codes.shape[0], in_features // QK
    q = (np.asarray(codes[:, :in_features], dtype=np.int16) - 128).astype(np.int8).view(np.uint8).reshape(n, nb, QK)
    s = np.repeat(np.asarray(scales, dtype=np.float32)[:, :1], nb, axis=1)
    return np.concatenate([_f16_bytes(s, n, nb), q], axis=2).reshape(n, -1)


# ----------------------------------------------------------------------------------------------- model reading
def _permute_rows(x, n_head: int):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py LlamaModel.permute) on the row axis of x [rows, ...]."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _rope_theta(mc: dict) -> float:
    rp = mc.get("rope_parameters") or mc.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError(f"rope scaling '{kind}' is not written to GGUF by this exporter",
                          "export a model with default rope, or use llama.cpp's convert_hf_to_gguf.py")
    return float(rp.get("rope_theta", mc.get("rope_theta", 10000.0)))


class _Weights:
    """Float tensors of an hf / torch-quant artifact by name (numpy), and its quantized layers' codes."""

    def __init__(self, art: Artifact):
        from safetensors import safe_open

        files = sorted(art.path.glob("*.safetensors"))
        if not files:
            raise ArtifactError(f"'{art.path}' has no .safetensors weights", "convert the checkpoint to safetensors")
        self._where, self._files = {}, files
        for f in files:
            with safe_open(str(f), framework="np") as h:
                for k in h.keys():
                    self._where[k] = f
        self.layers: dict = {}
        if art.format == "torch-quant":
            from edgepack.compress.quant_torch import read_quant_meta

            self.layers = read_quant_meta(art.path)["layers"]

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str):
        import numpy as np
        from safetensors import safe_open

        if name not in self._where:
            raise ArtifactError(f"tensor '{name}' is missing from the checkpoint", "re-run the stage that wrote it")
        with safe_open(str(self._where[name]), framework="np") as h:
            return np.asarray(h.get_tensor(name))

    def float_weight(self, name: str):
        """fp32 weight of `name` (a quantized layer dequantized from its codes)."""
        import numpy as np

        base = name.removesuffix(".weight")
        if base in self.layers:
            return self.quantized(base).dequantize().numpy()
        return np.asarray(self.get(name), dtype=np.float32)

    def quantized(self, base: str):
        import torch

        from edgepack.compress.quant_algos import QuantizedWeight
        from edgepack.compress.quant_torch import unpack_codes

        rec = self.layers[base]
        if rec.get("kind") != "int":
            raise ConfigError(f"layer {base} holds {rec.get('kind')} weights, which GGUF has no block type for",
                              "quantize with an integer method (int8, int4-*) for GGUF")
        codes = unpack_codes(torch.from_numpy(self.get(f"{base}.qweight")), rec["bits"])
        return QuantizedWeight(codes, torch.from_numpy(self.get(f"{base}.scales")).float(),
                               torch.from_numpy(self.get(f"{base}.zeros")).float(), rec["in_features"],
                               rec["group_size"], rec["bits"])


def _linear_entry(w: _Weights, hf_name: str, cfg: GgufConfig, permute: int | None) -> dict:
    """{data (bytes or float array), type, source, ref (fp32 weight as written, for the read-back check), scale}."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    base = hf_name.removesuffix(".weight")
    perm = (lambda x: _permute_rows(x, permute)) if permute else (lambda x: x)
    if base in w.layers:
        qw = w.quantized(base)
        k, g = qw.in_features, qw.group_size
        codes, scales, zeros = qw.codes.numpy(), qw.scales.numpy(), qw.zeros.numpy()
        codes, scales, zeros = perm(codes), perm(scales), perm(zeros)
        ref = perm(qw.dequantize().numpy())
        step = np.repeat(scales, g, axis=1)[:, :k]
        if k % QK == 0 and qw.bits == 4 and g % QK == 0:
            sym = bool((zeros == 8).all())
            return {"data": pack_q4(codes, scales, zeros, g, k, sym), "type": T.Q4_0 if sym else T.Q4_1,
                    "source": "codes", "ref": ref, "step": step}
        if k % QK == 0 and qw.bits == 8 and bool((zeros == 128).all()) and scales.shape[1] == 1:
            return {"data": pack_q8(codes, scales, k), "type": T.Q8_0, "source": "codes", "ref": ref, "step": step}
        why = (f"width {k} is not a multiple of {QK}" if k % QK else
               f"{qw.bits}-bit group {g} has no exact GGUF block type")
        if k % QK:
            return {"data": ref, "type": T.F32, "source": f"F32 (nearest: {why})", "ref": ref, "step": step}
        return {"data": gguf.quants.quantize(ref, T.Q8_0), "type": T.Q8_0, "ref": ref, "step": step,
                "source": f"Q8_0 of the dequantized codes (nearest: {why})"}
    ref = perm(w.float_weight(hf_name))
    return _float_entry(ref, cfg.type if cfg.type != "auto" else "f16", "float")


def _float_entry(ref, kind: str, source: str) -> dict:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if kind in ("q8_0", "q4_0") and ref.shape[-1] % QK:
        kind, source = "f16", f"{source} (F16: width {ref.shape[-1]} is not a multiple of {QK})"
    if kind == "f32":
        return {"data": ref.astype(np.float32), "type": T.F32, "source": source, "ref": ref}
    if kind == "f16":
        return {"data": ref.astype(np.float16), "type": T.F16, "source": source, "ref": ref}
    t = T.Q8_0 if kind == "q8_0" else T.Q4_0
    return {"data": gguf.quants.quantize(ref, t), "type": t, "source": source, "ref": ref}


# ----------------------------------------------------------------------------------------------- tokenizer
def _add_tokenizer(writer, src: Path, mc: dict, arch: str) -> dict:
    """The vocabulary from tokenizer.json: SentencePiece-style BPE (Metaspace / byte fallback, e.g. Llama 2,
    stories260K) -> ggml tokenizer model `llama`; byte-level BPE (GPT-2 style: Qwen2, SmolLM2) -> `gpt2` with merges.
    Ids beyond the tokenizer (a config vocab padded for alignment) become unused `[PAD<i>]` tokens."""
    import gguf

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"'{src}' has no tokenizer.json", "copy the model's tokenizer files beside it")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model '{model.get('type')}' is not written to GGUF by this exporter (BPE only)",
                          "use llama.cpp's convert_hf_to_gguf.py for this tokenizer")
    n = int(mc["vocab_size"])
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special = {int(a["id"]) for a in tj.get("added_tokens", []) if a.get("special")}
    for a in tj.get("added_tokens", []):
        tokens[int(a["id"])] = a["content"]
    if max(tokens) >= n:
        raise ConfigError(f"the tokenizer has ids up to {max(tokens)} but the model's vocab_size is {n}",
                          "export the tokenizer that belongs to this model")
    TT = gguf.TokenType
    pre = json.dumps(tj.get("pre_tokenizer"))
    spm = bool(model.get("byte_fallback")) or "Metaspace" in pre
    names, types = [], []
    for i in range(n):
        t = tokens.get(i)
        if t is None:
            names.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        names.append(t)
        if i in special:
            types.append(TT.UNKNOWN if t == model.get("unk_token") else TT.CONTROL)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list(names)
    writer.add_token_types(types)
    if spm:  # SentencePiece merges by score: the id order of a converted vocabulary (lower id = merged first)
        writer.add_token_scores([-float(i) for i in range(n)])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    tc_path = src / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        v = mc.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < n:
            add(v)
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"]:
        writer.add_unk_token_id(int(model["vocab"][unk]))
    writer.add_add_bos_token(bool(tc.get("add_bos_token", spm)))
    writer.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        writer.add_chat_template(tc["chat_template"])
    return {"tokenizer_model": "llama" if spm else "gpt2", "tokens": n, "merges": len(merges)}


# ----------------------------------------------------------------------------------------------- the stage
def model_arch(mc: dict) -> str:
    mt = mc.get("model_type")
    if mt not in ARCHS:
        raise ConfigError(f"GGUF export knows the architectures {', '.join(ARCHS)}, not '{mt}'",
                          "use llama.cpp's convert_hf_to_gguf.py for this model")
    return ARCHS[mt]


def tensor_plan(mc: dict, tied: bool) -> list[tuple[str, str]]:
    """(GGUF name, HF name) in the order written: embedding, each layer, final norm, output."""
    plan = [("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(int(mc["num_hidden_layers"])):
        for hf, gg in LAYER_TENSORS.items():
            plan.append((f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight"))
            if hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
                plan.append((f"blk.{i}.{gg}.bias", f"model.layers.{i}.{hf}.bias"))
    plan.append(("output_norm.weight", "model.norm.weight"))
    if not tied:
        plan.append(("output.weight", "lm_head.weight"))
    return plan


def _entries(w: _Weights, mc: dict, cfg: GgufConfig, arch: str, tied: bool, progress=None):
    """Yield (gguf name, entry) for every tensor, in file order."""
    import numpy as np

    heads, kv = int(mc["num_attention_heads"]), int(mc.get("num_key_value_heads") or mc["num_attention_heads"])
    for gname, hname in tensor_plan(mc, tied):
        if not w.has(hname) and hname.removesuffix(".weight") not in w.layers:
            if hname.endswith(".bias"):
                continue
            raise ArtifactError(f"tensor '{hname}' is missing from the checkpoint", "re-run the stage that wrote it")
        permute = None
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            permute = heads if ".attn_q." in gname else kv
        if gname in ("token_embd.weight", "output.weight"):
            e = _float_entry(w.float_weight(hname), cfg.head_type, "float (head_type)")
        elif gname.endswith(".bias") or "norm" in gname:
            ref = np.asarray(w.get(hname), dtype=np.float32)
            e = {"data": _permute_rows(ref, permute) if permute else ref, "type": None, "source": "float"}
            e["ref"] = e["data"]
        else:
            e = _linear_entry(w, hname, cfg, permute)
        if progress is not None:
            progress(gname)
        yield gname, e


FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "F16": 1, "F32": 0}  # llama_ftype (llama.h) of the linears' type


def write_gguf(src: Artifact, cfg: GgufConfig, path: Path, progress=None) -> dict:
    """Write src as GGUF at `path`; return {tensors: {name: {type, source}}, refs: {name: fp32 ref}, ...}."""
    import gguf
    import numpy as np

    from edgepack.facts import read_model_config

    mc = read_model_config(src.path)
    arch = model_arch(mc)
    if src.format == "torch-quant" and cfg.type != "auto":
        raise ConfigError(f"a torch-quant artifact is written with its own codes; type '{cfg.type}' applies to "
                          "float checkpoints", "drop --type, or export the float model")
    w = _Weights(src)
    tied = bool(mc.get("tie_word_embeddings", False)) or not w.has("lm_head.weight")
    heads = int(mc["num_attention_heads"])
    head_dim = int(mc.get("head_dim") or mc["hidden_size"] // heads)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(Path(src.base_model).name or "model")
    writer.add_context_length(int(mc.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(mc["hidden_size"]))
    writer.add_block_count(int(mc["num_hidden_layers"]))
    writer.add_feed_forward_length(int(mc["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(mc.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(mc.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(mc))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(mc["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(mc["vocab_size"]))
    tok = _add_tokenizer(writer, src.path, mc, arch)
    tensors, refs, steps, linear_types = {}, {}, {}, []
    for name, e in _entries(w, mc, cfg, arch, tied, progress):
        data, t = e["data"], e["type"]
        if t is None or t == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            t = gguf.GGMLQuantizationType.F32
        elif t == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=t)  # byte rows [N, K/32 * block bytes]
        tensors[name] = {"type": t.name, "source": e["source"], "shape": list(e["ref"].shape)}
        refs[name] = e["ref"]
        if "step" in e:
            steps[name] = e["step"]
        if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name:
            linear_types.append(t.name)
    main = max(set(linear_types), key=linear_types.count) if linear_types else "F32"
    writer.add_file_type(FILE_TYPE.get(main, 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "tensors": tensors, "refs": refs, "steps": steps, "file_type": main, **tok}


def read_gguf_tensors(path: Path) -> dict:
    """{name: fp32 numpy array in HF orientation [out, in]} of a GGUF file, dequantized by the gguf package's own
    reference code (independent of the writer above)."""
    import gguf
    import numpy as np

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return out


def compare_readback(path: Path, written: dict) -> dict:
    """Read the file back and compare tensor by tensor; {max_err_steps, max_abs_diff, tensors_checked}."""
    import numpy as np

    back = read_gguf_tensors(path)
    missing = sorted(set(written["refs"]) - set(back))
    if missing:
        raise ValidationFailed(f"GGUF read-back lacks {len(missing)} tensors ({', '.join(missing[:3])})",
                               "report this as a bug")
    worst_steps, worst_abs = 0.0, 0.0
    for name, ref in written["refs"].items():
        got = back[name]
        if got.shape != ref.shape:
            raise ValidationFailed(f"GGUF tensor {name} reads back as {got.shape}, written {ref.shape}",
                                   "report this as a bug")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        if name in written["steps"]:
            steps = float((diff / np.maximum(written["steps"][name], 1e-30)).max(initial=0.0))
            worst_steps = max(worst_steps, steps)
            if not steps <= MAX_ERR_STEPS:
                raise ValidationFailed(f"GGUF tensor {name} differs from our codes by {steps:.3f} quantization steps "
                                       f"(limit {MAX_ERR_STEPS}): the file does not hold the measured weights",
                                       "report this as a bug (a scale may overflow fp16)")
    return {"max_err_steps": round(worst_steps, 5), "max_abs_diff": worst_abs, "tensors_checked": len(written["refs"])}


def export_gguf(src: Artifact, cfg: GgufConfig, target, out: Path, *, force: bool = False) -> Artifact:
    """Write `src` (hf or torch-quant) as a 'gguf' artifact at `out`, checked by reading it back."""
    from edgepack.config import build_config
    from edgepack.hf import copy_tokenizer

    cfg = build_config(GgufConfig, asdict(cfg), "export gguf")
    check_output_dir(Path(out), force)
    if src.format not in ("hf", "torch-quant"):
        raise ArtifactError(f"GGUF export reads Hugging Face checkpoints or torch-quant artifacts, not '{src.format}'",
                            "quantize with --format torch (our codes) or pass the float model directory")
    require("gguf", "gguf", "GGUF export")
    from edgepack.facts import read_model_config

    mc = read_model_config(src.path)
    model_arch(mc)
    t0 = time.perf_counter()
    with ArtifactWriter(out, force=force) as w:
        written = write_gguf(src, cfg, w.path / GGUF_FILE)
        check = compare_readback(w.path / GGUF_FILE, written)
        copy_tokenizer(src.path, w.path)
        (w.path / "config.json").write_text(json.dumps(mc, indent=2))
        types: dict[str, int] = {}
        for t in written["tensors"].values():
            types[t["type"]] = types.get(t["type"], 0) + 1
        sources: dict[str, int] = {}
        for t in written["tensors"].values():
            sources[t["source"]] = sources.get(t["source"], 0) + 1
        precision = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8", "F16": "fp16"}.get(written["file_type"], "fp32")
        metrics = {"arch": written["arch"], "file_type": written["file_type"], "tensor_types": types,
                   "sources": sources, "tensors": {k: {"type": v["type"], "source": v["source"]}
                                                   for k, v in written["tensors"].items()},
                   "bytes": (w.path / GGUF_FILE).stat().st_size, "precision": precision,
                   "tokenizer_model": written["tokenizer_model"], **check}
        rec = stage_record("gguf", asdict(cfg), time.perf_counter() - t0, metrics,
                           target=target.name if target is not None else None, parent=src.digest())
        extra = {"gguf_file": GGUF_FILE, "arch": written["arch"], "vocab_size": int(mc["vocab_size"]),
                 "max_positions": int(mc.get("max_position_embeddings", 2048)), "precision": precision,
                 "file_type": written["file_type"], "made_by": "edgepack gguf export"}
        return w.commit(format="gguf", record=rec, parent=src, base_model=src.base_model, extra=extra)
