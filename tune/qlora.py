"""Stage `tune`: QLoRA (a bitsandbytes NF4 base with double quantization + LoRA adapters), plain LoRA, or full-parameter
fine-tuning (method "full": every weight of the unfrozen layers trains, no adapter).

`data` is one source or a weighted mix ("domain.jsonl:0.7", "general.txt:0.3"; tune.data.prepare_mix): with a mix,
validation perplexity (early stopping, the recorded figures) is exp(sum of share x log perplexity) over the sources'
own validation splits, and every source's validation / test perplexity before and after is recorded
(`ppl_by_source`), so forgetting the general data shows next to learning the domain. `freeze_layers` keeps decoder
layers frozen: LoRA puts no adapter on them (peft layers_to_transform), full tuning leaves their weights as they are.

The output is a full-precision Hugging Face artifact ready for distill / prune / quantize: the adapter is merged into
a float32 copy of the base, never into the 4-bit base (merging into Linear4bit re-quantizes W + BA and loses the
update). `merge_into` picks that copy: "dequantized" (default) is the NF4 base dequantized to float32, i.e. exactly
the weights the adapter was trained against, so the merged model computes what the trained model computed;
"original" uses the base's own full-precision weights (the quantization error of the base is then not baked in, but
the merged model differs from the trained one by it). The adapter itself is kept in `adapter/` (peft format), the
TensorBoard logs in `logs/`. With merge=False the artifact is the adapter alone (format "lora-adapter").

Training runs through `accelerate`, so the same code runs single-process (tested) or under `accelerate launch` (DDP;
FSDP with bnb_4bit_quant_storage equal to the compute dtype, which this sets). Only the main process writes.
Checkpoints (adapter, optimizer, scheduler position, RNG, early-stopping state) go to `<out>.checkpoints/`, are
guarded by a fingerprint of (base, data, config), and are resumed from with `resume`; they are removed on success.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, stage_record
from edgepack.errors import ConfigError, ValidationFailed, require
from edgepack.tune.data import PrepareConfig

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
METHODS = ("qlora", "lora", "full")
FREEZE_WORDS = ("embeddings", "lm_head")  # full tuning only: the token embedding (and a tied lm_head), the lm_head


@dataclass(frozen=True)
class TuneConfig:
    # a data file (.jsonl/.json/.txt), a `tune prepare` folder, or a mix: ["domain.jsonl:0.7", "general.txt:0.3"]
    data: str | tuple[str, ...] = field(default="", metadata={"path": True})
    mix_strategy: str = field(default="under", metadata={"choices": ("under", "over")})  # a mix: tune.data.prepare_mix
    method: Literal["qlora", "lora", "full"] = "qlora"  # qlora: NF4 4-bit base + LoRA; lora: base in the compute dtype; full: no adapter
    # decoder layers that do not train: indices (negative count from the end), "first:N", "last:N"; full also
    # "embeddings" (token embedding, and lm_head when tied) and "lm_head"
    freeze_layers: tuple[int | str, ...] = ()
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA scaling numerator (update is alpha / r * B A)
    dropout: float = 0.05  # dropout on the LoRA input path
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or "all-linear" (every linear but lm_head)
    seq_len: int = 256  # tokens per packed sequence
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 400  # optimizer steps (the most; early stopping may end sooner)
    lr: float = 2e-4  # peak learning rate (AdamW); the QLoRA paper's 7B-13B value. stories260K wants ~3e-3
    warmup_steps: int = 20  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm over the trainable parameters)
    eval_every: int = 50  # optimizer steps between validation perplexity measurements
    eval_blocks: int | None = 64  # validation sequences per measurement (None: all)
    patience: int = 3  # measurements without improvement before stopping early (0: never)
    save_every: int = 100  # optimizer steps between checkpoints
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    double_quant: bool = True  # quantize the NF4 scales too (QLoRA double quantization)
    compute_dtype: str = field(default="auto", metadata={"choices": DTYPE_NAMES})  # auto: float32 on CPU, bfloat16 on GPUs that have it (else float32)
    merge: bool = True  # write a merged full-precision model (else the adapter alone)
    merge_into: Literal["dequantized", "original"] = "dequantized"  # which full-precision base (see module doc)
    seed: int = 0  # LoRA init, dropout and data order
    data_seed: int = 0  # train/validation/test split of a raw data file
    max_minutes: float | None = None  # stop training after this much wall time (the best adapter so far is kept)
    threads: int | None = None  # CPU intra-op threads (None: torch's default). On a shared, oversubscribed CPU
    # 1 thread avoids OpenMP spin-waiting: a 2048x64x172 matmul took 53 ms with 2 threads vs 3 ms with 1 here.

    def validate(self) -> list[str]:
        errs = [] if self.data else ["'data' is required (a data file or a 'tune prepare' folder)"]
        if self.mix_strategy not in ("under", "over"):
            errs.append("mix_strategy must be under or over")
        if not isinstance(self.data, str) and len(self.data) > 1:
            from edgepack.sources import split_weight

            unweighted = [d for d in self.data if split_weight(d)[1] is None]
            if unweighted:
                errs.append(f"data source '{unweighted[0]}' of a mix has no weight (write PATH:WEIGHT, e.g. a.jsonl:0.7)")
        for item in self.freeze_layers:
            try:
                _freeze_item(item, 10 ** 6)
            except ValueError as exc:
                errs.append(str(exc))
            if str(item) in FREEZE_WORDS and self.method != "full":
                errs.append(f"freeze_layers '{item}' applies to method full (LoRA puts no adapter on {item})")
        for name in ("rank", "seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1")
        if not 0 <= self.dropout < 1:
            errs.append("dropout must be in [0, 1)")
        if self.lr <= 0 or self.alpha <= 0 or self.max_grad_norm <= 0:
            errs.append("lr, alpha and max_grad_norm must be > 0")
        if self.threads is not None and self.threads < 1:
            errs.append("threads must be >= 1 (or None for torch's default)")
        if self.warmup_steps < 0 or self.patience < 0 or not 0 <= self.min_lr_ratio <= 1:
            errs.append("warmup_steps and patience must be >= 0, min_lr_ratio in [0, 1]")
        if self.compute_dtype not in DTYPE_NAMES:
            errs.append(f"compute_dtype must be one of {', '.join(DTYPE_NAMES)}")
        if not self.target_modules:
            errs.append("target_modules must name at least one module (or 'all-linear')")
        return errs

    def peft_targets(self):
        return "all-linear" if tuple(self.target_modules) == ("all-linear",) else list(self.target_modules)


def _freeze_item(item, n_layers: int) -> set[int] | str:
    """Layer indices (or a FREEZE_WORDS word) one freeze_layers entry names; ValueError names a bad entry."""
    text = str(item).strip()
    if text in FREEZE_WORDS:
        return text
    how, _, count = text.partition(":")
    try:
        if how in ("first", "last") and count:
            k = int(count)
            if k < 0:
                raise ValueError
            return set(range(min(k, n_layers))) if how == "first" else set(range(max(0, n_layers - k), n_layers))
        i = int(text)
    except ValueError:
        raise ValueError(f"freeze_layers entry '{item}' is not a layer index, 'first:N', 'last:N' or one of "
                         f"{', '.join(FREEZE_WORDS)}") from None
    if not -n_layers <= i < n_layers:
        raise ValueError(f"freeze_layers entry {i} is out of range for a model with {n_layers} layers")
    return {i % n_layers}


def frozen_layers(cfg: TuneConfig, n_layers: int) -> tuple[list[int], list[str]]:
    """(sorted decoder-layer indices, FREEZE_WORDS words) that cfg.freeze_layers names for a model of n_layers."""
    idx, words = set(), []
    for item in cfg.freeze_layers:
        try:
            got = _freeze_item(item, n_layers)
        except ValueError as exc:
            raise ConfigError(str(exc), "freeze_layers takes indices, 'first:N', 'last:N'") from None
        if isinstance(got, str):
            words.append(got)
        else:
            idx |= got
    if len(idx) >= n_layers:
        raise ConfigError(f"freeze_layers freezes all {n_layers} decoder layers", "leave at least one layer to train")
    return sorted(idx), words


def _n_layers(model) -> int:
    from edgepack.compress.prune_algos import decoder_layers

    return len(decoder_layers(model))


def freeze_(model, cfg: TuneConfig) -> dict:
    """Method full: every parameter trains but those of the frozen layers (and words); returns what was frozen."""
    from edgepack.compress.prune_algos import decoder_layers

    for p in model.parameters():
        p.requires_grad_(True)
    if not cfg.freeze_layers:
        return {"layers": [], "other": []}
    layers, words = frozen_layers(cfg, _n_layers(model))
    for i in layers:
        for p in decoder_layers(model)[i].parameters():
            p.requires_grad_(False)
    if "embeddings" in words:
        model.get_input_embeddings().weight.requires_grad_(False)
    if "lm_head" in words:
        model.get_output_embeddings().weight.requires_grad_(False)
    return {"layers": layers, "other": words}


def lr_at(step: int, cfg: TuneConfig) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): tune.schedule.warmup_cosine, shared with
    distillation's loop (compress/distill.py)."""
    from edgepack.tune.schedule import warmup_cosine

    return warmup_cosine(step, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)


def resolve_compute_dtype(cfg: TuneConfig, device: str):
    import torch

    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPU: bf16 matmuls are ~40x slower than fp32 on a CPU without AMX / AVX512-BF16


# ------------------------------------------------------------------------------------------------ model loading
def load_base(path: Path, cfg: TuneConfig, device: str, dtype, fsdp: bool = False):
    """The base model for training: NF4-quantized (qlora) or in `dtype` (lora). Verifies that 4-bit really happened."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = {}
    if cfg.method == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, trust_remote_code=False,
                                                    local_files_only=True,
                                                    use_safetensors=any(Path(path).glob("*.safetensors")))
    if cfg.method == "qlora":
        bnb = require("bitsandbytes", "tune", "QLoRA's 4-bit NF4 base")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if fsdp else torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, trust_remote_code=False,
                                                 local_files_only=True, use_safetensors=any(Path(path).glob("*.safetensors")),
                                                 **kw)
    if cfg.method == "qlora":
        n4 = 0
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                if not isinstance(mod.weight, bnb.nn.Params4bit) or mod.weight.quant_state is None:
                    raise ValidationFailed(f"bitsandbytes left {type(mod.weight).__name__} unquantized",
                                           "upgrade bitsandbytes (>= 0.45 quantizes on CPU) or use --method lora")
                # bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel in eval mode; that path needs
                # out_features % 32 == 0 (stories260K's MLP is 172 wide) and computes in bf16, unlike training.
                mod.support_avx512bf16_for_cpu = False
                n4 += 1
        if n4 == 0:
            raise ValidationFailed("bitsandbytes quantized no linear layer to 4 bits (it fell back silently)",
                                   "upgrade bitsandbytes (>= 0.45 quantizes on CPU) or use --method lora")
        model.edgepack_4bit_layers = n4
    return model


def add_lora(model, cfg: TuneConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:  # transformers 5 renamed it; keep working with both names
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers, targets = None, cfg.peft_targets()
    if cfg.freeze_layers:
        n = _n_layers(model)
        frozen = frozen_layers(cfg, n)[0]
        layers = [i for i in range(n) if i not in frozen]
    moe = any(type(m).__name__.endswith("Experts") for m in model.modules())
    # Name the linears ourselves where peft's "all-linear" will not do: it takes layers_to_transform only with module
    # names, and on an MoE it also wraps the 3-D routed-expert parameters (a ParamWrapper that refuses dropout) and
    # the routers (kept as they are: a LoRA on a router moves tokens to other experts)
    if targets == "all-linear" and (layers is not None or moe):
        import torch

        from edgepack.compress.quant_algos import is_router

        head = model.get_output_embeddings()
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not head and not is_router(name)})
    if targets != "all-linear":  # a name that matches no module: say which names exist (peft raises a ValueError)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = sorted(set(targets) - names)
        if unknown:
            from edgepack.errors import did_you_mean

            raise ConfigError(f"target_modules {', '.join(unknown)}: no module of the model has that name"
                              f"{did_you_mean(unknown[0], names)}", "use 'all-linear' or names such as q_proj, v_proj")
    dropout = cfg.dropout
    if moe and dropout:  # peft maps gate/up/down onto the 3-D routed experts (ParamWrapper), which take no dropout
        import sys

        dropout = 0.0
        print(f"tune: lora_dropout {cfg.dropout:g} -> 0 on this MoE: peft's LoRA on the routed experts takes no "
              "dropout", file=sys.stderr, flush=True)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", layers_to_transform=layers)
    return get_peft_model(model, lcfg)


def prepare_full(model, cfg: TuneConfig) -> dict:
    """Method full: train every weight but the frozen ones (freeze_); optional gradient checkpointing."""
    frozen = freeze_(model, cfg)
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; keep working with both names
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return frozen


def dequantized_state(model) -> dict:
    """{parameter name: float32 weight} of every Linear4bit in a (peft-wrapped) model, dequantized from NF4."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "") + ".weight"
            out[key] = w.cpu()
    return out


# ----------------------------------------------------------------------------------------------------------- stage
PPL_PROTOCOL = "edgepack-masked-v1: exp(mean NLL over loss-carrying tokens of the first eval_blocks packed seq_len blocks)"


def _merge(src: Artifact, model, adapter_dir: Path, cfg: TuneConfig):
    """The adapter merged into a float32 copy of the base (never into the 4-bit base); see the module docstring."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, device_map={"": "cpu"},
                                                trust_remote_code=False, local_files_only=True)
    if cfg.method == "qlora" and cfg.merge_into == "dequantized":
        deq = dequantized_state(model)
        own = base.state_dict()
        missing = [k for k in deq if k not in own]
        if missing:
            raise ValidationFailed(f"cannot map 4-bit layer {missing[0]} onto the full-precision base",
                                   "use merge_into = 'original'")
        with torch.no_grad():
            for k, w in deq.items():
                own[k].copy_(w.reshape(own[k].shape))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.eval()


def tune(src: Artifact, cfg: TuneConfig, target, out: Path, *, force: bool = False, resume: bool | None = None,
         on_step=None) -> Artifact:
    """Fine-tune `src` on cfg.data. resume: True continues from checkpoints (error if none), False refuses to
    overwrite existing ones unless force, None (recipes) continues when a checkpoint of the same run exists."""
    import resource

    import torch

    if cfg.method != "full":
        require("peft", "tune", "LoRA adapters")
    accelerate = require("accelerate", "tune", "the training loop (single process or accelerate launch)")
    from edgepack.facts import check_fits_context, weight_bytes
    from edgepack.hf import load_model, load_tokenizer, save_model
    from edgepack.tune.checkpoint import checkpoint_dir, fingerprint, read_state
    from edgepack.tune.data import load_or_prepare, tokenize_sources, tokenize_splits
    from edgepack.tune.trainer import masked_perplexity, train

    t0 = time.perf_counter()
    out = Path(out)
    check_output_dir(out, force, [src.path])
    check_fits_context(src, cfg.seq_len, "seq_len")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if src.format != "hf":
        raise ConfigError(f"'{src.path}' is a '{src.format}' artifact; tune needs a Hugging Face checkpoint",
                          "tune before export / compile, at the start of the chain")
    tok = load_tokenizer(src.path)
    prep = load_or_prepare(cfg.data, PrepareConfig(seed=cfg.data_seed, mix_strategy=cfg.mix_strategy), tok)
    weights = prep.source_weights()
    data_digest = hashlib.sha256(json.dumps({"splits": {k: [r.data for r in v] for k, v in prep.splits.items()},
                                             "weights": weights}, sort_keys=True).encode()).hexdigest()
    ckdir, fp = checkpoint_dir(out), fingerprint(src.digest(), data_digest, cfg)
    state = read_state(ckdir)
    if state is not None and (state.get("fingerprint") != fp or resume is False):
        if not force:
            why = "were made with a different base, data or config" if state.get("fingerprint") != fp else "exist"
            raise ConfigError(f"checkpoints in '{ckdir}' {why} (step {state['step']})",
                              "pass --resume to continue them, or --force to start over")
        shutil.rmtree(ckdir, ignore_errors=True)
        state = None
    if resume and state is None:  # killed before the first checkpoint: nothing was kept, so start from step 0
        import sys

        print(f"  tune: no checkpoint in '{ckdir}' yet: starting from step 0", file=sys.stderr, flush=True)

    accelerator = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    device = str(accelerator.device)
    dtype = resolve_compute_dtype(cfg, device)
    fsdp = accelerator.distributed_type.name == "FSDP"
    blocks, token_stats = tokenize_splits(prep, tok, cfg.seq_len)
    if blocks["validation"][0].shape[0] == 0:
        raise ConfigError("the validation split is empty", "use more data (the split is 8:1:1)")
    by_source = tokenize_sources(prep, tok, cfg.seq_len)

    def split_ppl(model, split: str) -> tuple[float, dict]:
        """(perplexity of the split, {source: perplexity}); a mix: exp(sum share x log ppl) over its sources."""
        if not by_source:
            ids = blocks[split][0]
            return (masked_perplexity(model, *blocks[split], cfg.batch_size, cfg.eval_blocks)
                    if ids.shape[0] else float("nan")), {}
        per = {n: masked_perplexity(model, *b[split], cfg.batch_size, cfg.eval_blocks)
               for n, b in by_source.items() if b[split][0].shape[0]}
        total = sum(weights[n] for n in per)
        return math.exp(sum(weights[n] * math.log(v) for n, v in per.items()) / total), per

    def val_test(model) -> tuple[float, float, dict]:
        (val, val_per), (test, test_per) = split_ppl(model, "validation"), split_ppl(model, "test")
        return val, test, {n: {"validation": round(val_per[n], 4), "test": round(test_per[n], 4) if n in test_per
                               else None} for n in val_per}

    base = load_model(src, device=device)  # the full-precision reference (stored 16-bit dtype on a GPU)
    before_val, before_test, before_src = val_test(base)
    del base
    torch.manual_seed(cfg.seed)
    model = load_base(src.path, cfg, device, dtype, fsdp)
    frozen = prepare_full(model, cfg) if cfg.method == "full" else None
    if cfg.method != "full":
        model = add_lora(model, cfg)
        frozen = {"layers": frozen_layers(cfg, _n_layers(model.get_base_model()))[0] if cfg.freeze_layers else [],
                  "other": []}
    n4 = getattr(model.get_base_model(), "edgepack_4bit_layers", 0) if cfg.method != "full" else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ckdir.mkdir(parents=True, exist_ok=True)
    res = train(model, blocks, cfg, ckdir, fp, accelerator, resume=state is not None, on_step=on_step,
                log_dir=ckdir / "tensorboard", val_fn=(lambda m: split_ppl(m, "validation")[0]) if by_source else None)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: process high-water mark (bytes)
    model = accelerator.unwrap_model(model)
    adapter_val, adapter_test, adapter_src = val_test(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        from edgepack.artifact import open_artifact

        return open_artifact(out)
    metrics = {
        "method": cfg.method, "device": device, "compute_dtype": str(dtype).removeprefix("torch."),
        "layers_4bit": n4, "trainable_params": trainable, "steps": res.steps, "stopped": res.stopped,
        "best_step": res.best_step, "resumed_from": res.resumed_from, "train_seconds": round(res.train_seconds, 2),
        "train_cpu_seconds": round(res.train_cpu_seconds, 2),
        "trained_tokens": res.trained_tokens, "tokens_per_s": round(res.trained_tokens / max(res.train_seconds, 1e-9), 1),
        "peak_memory_bytes": peak, "processes": accelerator.num_processes,
        "peak_memory_kind": "cuda max_memory_allocated during training" if torch.cuda.is_available()
        else "process peak RSS (ru_maxrss: lifetime high-water mark, includes the fp32 reference model)",
        "ppl_protocol": PPL_PROTOCOL, "eval_blocks": cfg.eval_blocks, "seq_len": cfg.seq_len,
        "ppl_before": round(before_val, 4), "ppl_start": round(res.start_val_ppl, 4), "ppl_adapter": round(adapter_val, 4),
        "test_ppl_before": round(before_test, 4), "test_ppl_adapter": round(adapter_test, 4),
        "curve": res.curve, "data": {"splits": {k: len(v) for k, v in prep.splits.items()}, "tokens": token_stats,
                                      "dropped": prep.report.get("dropped_counts")},
        "frozen": frozen,
    }
    if weights:
        metrics["data"]["mix"] = {**prep.report["mix"], "sources": [
            {k: s[k] for k in ("name", "path", "sha256", "weight", "share", "splits", "drawn")}
            for s in prep.report["sources"]]}
        metrics["ppl_by_source"] = {n: {"share": weights[n], "before": before_src[n], "adapter": adapter_src[n]}
                                    for n in before_src}
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        (w.path / "data_report.json").write_text(json.dumps(prep.report, indent=1, ensure_ascii=False) + "\n")
        if (ckdir / "tensorboard").is_dir():
            shutil.copytree(ckdir / "tensorboard", w.path / "logs")
        if cfg.method == "full":  # the trained model is the output: no adapter, nothing to merge
            metrics.update(ppl_after=round(adapter_val, 4), test_ppl_after=round(adapter_test, 4))
            if weights:
                for n in adapter_src:
                    metrics["ppl_by_source"][n]["after"] = adapter_src[n]
            save_model(model.to("cpu"), w.path, tokenizer_from=src.path, dtype="float32")
            metrics["bytes"] = weight_bytes(w.path)
            fmt, extra = "hf", {"logs": "logs"}
        else:
            adapter_dir = w.path / "adapter"
            model.save_pretrained(adapter_dir, safe_serialization=True)
        if cfg.method != "full" and cfg.merge:
            merged = _merge(src, model, adapter_dir, cfg)
            del model
            merged_val, merged_test, merged_src = val_test(merged.to(device))
            rel = abs(merged_val - adapter_val) / adapter_val
            metrics.update(ppl_after=round(merged_val, 4), test_ppl_after=round(merged_test, 4),
                           merge_into=cfg.merge_into, merge_rel_diff=round(rel, 6))
            if weights:
                for n in merged_src:
                    metrics["ppl_by_source"][n]["after"] = merged_src[n]
            if cfg.merge_into == "dequantized" and rel > 0.01:
                raise ValidationFailed(f"the merged model's perplexity {merged_val:.4f} differs from the adapter "
                                       f"model's {adapter_val:.4f} by {rel:.2%} (> 1%)",
                                       "this is a bug in the merge; keep the adapter with --no-merge")
            save_model(merged.to("cpu"), w.path, tokenizer_from=src.path, dtype="float32")
            metrics["bytes"] = weight_bytes(w.path)
            fmt, extra = "hf", {"adapter": "adapter", "logs": "logs"}
        elif cfg.method != "full":
            metrics["ppl_after"] = round(adapter_val, 4)
            for n in adapter_src if weights else ():
                metrics["ppl_by_source"][n]["after"] = adapter_src[n]
            fmt, extra = "lora-adapter", {"adapter": "adapter", "base_model_path": str(src.path), "logs": "logs"}
        cfg_dict = asdict(cfg)
        rec = stage_record("tune", cfg_dict, time.perf_counter() - t0, metrics, parent=src.digest())
        art = w.commit(format=fmt, record=rec, parent=src, base_model=src.base_model, extra=extra)
    shutil.rmtree(ckdir, ignore_errors=True)  # the run finished: its checkpoints are no longer needed
    accelerator.wait_for_everyone()
    return art
