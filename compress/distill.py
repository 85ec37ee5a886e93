"""Stage `distill`: train a (pruned) student to match a teacher, then record teacher and student perplexity.

    loss = alpha * CE(student, next token) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

with softmax at temperature T on both sides (the T^2 keeps the soft-target gradients on the CE scale, Hinton et al.
2015). alpha is constant, or linear from `alpha` to `alpha_end` over training (e.g. 0.7 -> 0.3). alpha = 1 is plain
cross-entropy fine-tuning, the baseline distillation has to beat.

Data: one UTF-8 text, tokenized as one stream and cut into fixed `seq_len` chunks; the first (1 - holdout) trains, the
last `holdout` is held out (see compress/prune.py). AdamW with linear warmup then cosine decay; gradient accumulation;
evaluation on the held-out split (edgepack-ppl-v1) every `eval_every` steps, keeping the best weights and stopping
after `patience` evaluations without improvement. A checkpoint (student, optimizer, step, best weights) is written to a
hidden sibling `.<out>.ckpt/` every `checkpoint_every` steps and removed after the artifact is committed, so a killed
run resumes where it stopped. The data order is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, open_artifact, stage_record
from edgepack.errors import ArtifactError, ConfigError

CACHE_LIMIT_BYTES = 1 << 30  # teacher logits kept in memory (float16) only up to this size; else on the fly


@dataclass(frozen=True)
class DistillConfig:
    data: str = field(default="", metadata={"path": True})  # UTF-8 text; "" = the embedded TinyStories sample
    teacher: str = field(default="", metadata={"path": True})  # teacher checkpoint; "" = the student's base model
    holdout: float = 0.1  # last fraction of the token stream, held out for evaluation and early stopping
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 400  # optimizer steps
    max_seconds: float | None = None  # also stop after this much training time (s); best weights are kept
    lr: float = 3e-3  # peak learning rate (AdamW); what the bench measured with
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup (optimizer steps)
    weight_decay: float = 0.0
    alpha: float = 0.7  # weight of the cross-entropy term (1 = plain fine-tuning, no teacher); 0.7 measured best of
    # 0.3 / 0.7 / 0.9 healing a depth-pruned stories260K on in-domain text (scripts/prune_distill.py)
    alpha_end: float | None = None  # None: constant alpha; else linear from alpha to alpha_end over steps
    temperature: float = 2.0  # softmax temperature of the KL term
    eval_every: int = 50  # optimizer steps between held-out evaluations
    patience: int = 4  # evaluations without improvement before stopping (0 = never stop early)
    eval_max_tokens: int | None = None  # score at most this many held-out tokens per evaluation
    teacher_cache: str = field(default="memory", metadata={"choices": ("memory", "none")})  # memory: float16 teacher logits cached per chunk; none: recompute every time
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default)
    task: str = field(default="", metadata={"path": True})  # task file (edgepack.tasks): task metrics before / after
    task_samples: int | None = 64  # held-out task items scored (None: all)
    max_task_drop: float | None = None  # points the task metric may fall; more fails the stage and writes nothing

    def validate(self) -> list[str]:
        errs = []
        if self.max_task_drop is not None and self.max_task_drop < 0:
            errs.append("max_task_drop must be >= 0 (points)")
        if self.task_samples is not None and self.task_samples < 1:
            errs.append("task_samples must be >= 1")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1")
        if not 0.0 < self.holdout < 0.5:
            errs.append("holdout must be in (0, 0.5)")
        for name in ("alpha", "alpha_end"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                errs.append(f"{name} must be in [0, 1]")
        if self.temperature <= 0 or self.lr <= 0:
            errs.append("temperature and lr must be > 0")
        if self.teacher_cache not in ("memory", "none"):
            errs.append("teacher_cache must be 'memory' or 'none'")
        if self.warmup_steps < 0 or self.patience < 0 or not 0 <= self.min_lr_ratio <= 1:
            errs.append("warmup_steps and patience must be >= 0, min_lr_ratio in [0, 1]")
        return errs

    def alpha_at(self, step: int) -> float:
        if self.alpha_end is None:
            return self.alpha
        return self.alpha + (self.alpha_end - self.alpha) * min(1.0, step / max(1, self.steps))

    def lr_at(self, step: int) -> float:
        """lr x tune.schedule.warmup_cosine (the schedule the LoRA loop in tune/trainer.py uses too)."""
        from edgepack.tune.schedule import warmup_cosine

        return self.lr * warmup_cosine(step, warmup=self.warmup_steps, total=self.steps, min_ratio=self.min_lr_ratio)

    def uses_teacher(self) -> bool:
        return self.alpha < 1.0 or (self.alpha_end is not None and self.alpha_end < 1.0)


def distill_loss(student_logits, teacher_logits, ids, alpha: float, temperature: float):
    """(loss, ce, kl) over next-token positions. KL(teacher || student) at temperature T, mean per token."""
    import torch.nn.functional as F

    s = student_logits[:, :-1].float()
    v = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, v), ids[:, 1:].reshape(-1))
    if teacher_logits is None or alpha >= 1.0:
        return ce, ce, s.new_zeros(())
    t = teacher_logits[:, :-1].float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1).reshape(-1, v), F.log_softmax(t / temperature, -1).reshape(-1, v),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl, ce, kl


def check_same_tokenizer(teacher_dir: Path, student_dir: Path, teacher_model=None, student_model=None) -> None:
    from edgepack.hf import load_tokenizer

    tv, sv = load_tokenizer(teacher_dir).get_vocab(), load_tokenizer(student_dir).get_vocab()
    sizes = (getattr(getattr(teacher_model, "config", None), "vocab_size", None),
             getattr(getattr(student_model, "config", None), "vocab_size", None))
    if tv != sv or sizes[0] != sizes[1]:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        raise ConfigError(f"teacher '{teacher_dir}' and student '{student_dir}' do not share a tokenizer "
                          f"(vocab {len(tv)} vs {len(sv)} entries, model vocab_size {sizes[0]} vs {sizes[1]}; "
                          f"e.g. {diff})",
                          "distillation compares logits token by token: use a student made from the teacher "
                          "(--student-from-prune) or one trained with the same tokenizer")


def resolve_teacher(src: Artifact, cfg: DistillConfig) -> Artifact:
    from edgepack.compress.prune import text_path

    path = text_path(cfg.teacher) if cfg.teacher else Path(src.base_model)
    if not path.is_dir():
        raise ArtifactError(f"teacher '{path}' is not a model directory",
                            "pass the teacher checkpoint explicitly (teacher = ... / the TEACHER argument)")
    if path.resolve() == src.path.resolve():
        raise ConfigError(f"the teacher and the student are the same model ('{path}')",
                          "pass a pruned or smaller student, or set the teacher explicitly")
    return open_artifact(path)


def checkpoint_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.ckpt"


def _run_key(teacher: Artifact, src: Artifact, cfg: DistillConfig) -> str:
    cfg_d = {k: v for k, v in asdict(cfg).items() if k not in ("max_seconds", "threads", "teacher")}
    blob = json.dumps({"teacher": teacher.digest(), "student": src.digest(), "cfg": cfg_d}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train(student, teacher, train_chunks, eval_fn, cfg: DistillConfig, ckpt_path: Path | None = None,
          on_step=None) -> dict:
    """The distillation loop (a pure verb on torch models). Leaves the best weights (by eval_fn, lower is better) in
    `student` and returns the run summary. eval_fn(student) -> held-out perplexity. It stays apart from the LoRA loop
    in tune/trainer.py (full-parameter student, teacher logits, no accelerate / adapters); both take their
    learning-rate schedule from tune.schedule."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    n_chunks = len(train_chunks)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    vocab = student.config.vocab_size
    cache_bytes = n_chunks * cfg.seq_len * vocab * 2
    use_cache = cfg.uses_teacher() and cfg.teacher_cache == "memory" and cache_bytes <= CACHE_LIMIT_BYTES
    cache: dict[int, torch.Tensor] = {}
    state = {"step": 0, "best_ppl": float("inf"), "best_step": 0, "bad_evals": 0, "curve": [], "resumed_from": 0,
             "train_seconds": 0.0}
    best_weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if ckpt_path is not None and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)  # our own file; weights_only refuses arbitrary objects
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        best_weights = ck["best"]
        state.update(json.loads(ck["state"]))
        state["resumed_from"] = state["step"]

    def save_ckpt():
        if ckpt_path is None:
            return
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "best": best_weights,
                    "state": json.dumps(state)}, tmp)
        tmp.replace(ckpt_path)

    def batch_rows(micro: int) -> torch.Tensor:
        first = micro * cfg.batch_size  # global index of the micro-batch's first sequence
        rows = []
        for g in range(first, first + cfg.batch_size):
            epoch, pos = divmod(g, n_chunks)
            perm = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            rows.append(int(perm[pos]))
        return torch.tensor(rows)

    def teacher_logits(rows: torch.Tensor):
        if not cfg.uses_teacher():
            return None
        missing = [int(r) for r in rows if int(r) not in cache] if use_cache else [int(r) for r in rows]
        fresh = {}
        if missing:
            with torch.no_grad():
                logits = teacher(train_chunks[missing], use_cache=False).logits
            if use_cache:  # round fresh logits too, so a chunk's targets do not depend on when it was first seen
                logits = logits.half()
                cache.update({r: logits[i] for i, r in enumerate(missing)})
            fresh = {r: logits[i] for i, r in enumerate(missing)}
        return torch.stack([(fresh[int(r)] if int(r) in fresh else cache[int(r)]).float() for r in rows])

    stopped = "max_steps"
    t_start = time.perf_counter() - state["train_seconds"]
    cpu_start = time.process_time() - state.get("train_cpu_seconds", 0.0)  # CPU time: honest on a shared machine
    student.train()
    if state["step"] == 0:  # the untrained student is a candidate too: the stage never returns a worse model
        state.update(ppl_start=eval_fn(student), best_step=0)
        state["best_ppl"] = state["ppl_start"]
        student.train()
    while state["step"] < cfg.steps:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        alpha = cfg.alpha_at(step)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(cfg.grad_accum):
            rows = batch_rows(step * cfg.grad_accum + a)
            ids = train_chunks[rows]
            t_logits = teacher_logits(rows)
            with torch.enable_grad():
                loss, _ce, _kl = distill_loss(student(ids, use_cache=False).logits, t_logits, ids, alpha,
                                              cfg.temperature)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        state["step"] = step + 1
        state["train_seconds"] = time.perf_counter() - t_start
        state["train_cpu_seconds"] = time.process_time() - cpu_start
        if on_step:
            on_step(state["step"], cfg.steps)
        last = state["step"] == cfg.steps
        out_of_time = cfg.max_seconds is not None and state["train_seconds"] >= cfg.max_seconds
        if state["step"] % cfg.eval_every == 0 or last or out_of_time:
            ppl = eval_fn(student)
            student.train()
            state["curve"].append({"step": state["step"], "loss": round(loss_sum, 5), "heldout_ppl": round(ppl, 5),
                                   "seconds": round(state["train_seconds"], 1), "alpha": round(alpha, 4)})
            if ppl < state["best_ppl"]:
                state.update(best_ppl=ppl, best_step=state["step"], bad_evals=0)
                best_weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                state["bad_evals"] += 1
            if cfg.patience and state["bad_evals"] >= cfg.patience:
                stopped = "early_stop"
                break
        if out_of_time:
            stopped = "max_seconds"
            break
        if state["step"] % cfg.checkpoint_every == 0:
            save_ckpt()
    student.load_state_dict(best_weights)
    student.eval()
    return {**state, "stopped": stopped, "teacher_cache": "memory" if use_cache else "none",
            "tokens_seen": state["step"] * cfg.grad_accum * cfg.batch_size * cfg.seq_len}


def kl_to_teacher(student, teacher, ids: list[int], seq_len: int, max_tokens: int = 8192) -> float:
    """Mean per-token KL(teacher || student) at T = 1 on held-out ids (nats/token)."""
    import torch
    import torch.nn.functional as F

    from edgepack.compress.prune import chunk

    x = chunk(ids, seq_len, max_tokens)
    with torch.no_grad():
        s = F.log_softmax(student(x, use_cache=False).logits.float(), -1)
        t = F.log_softmax(teacher(x, use_cache=False).logits.float(), -1)
    return float(F.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), log_target=True,
                          reduction="batchmean"))


def distill(src: Artifact, cfg: DistillConfig, target, out: Path, *, force: bool = False,
            show_progress: bool = True) -> Artifact:
    """Stage function: `src` is the student; the teacher is cfg.teacher (or the student's base model)."""
    import torch

    from edgepack.artifact import check_output_dir
    from edgepack.compress.prune import chunk, heldout_perplexity, split_stream, text_path
    from edgepack.facts import check_fits_context, weight_bytes
    from edgepack.hf import load_model, load_tokenizer, save_model
    from edgepack.progress import progress

    check_output_dir(Path(out), force, [src.path])
    check_fits_context(src, cfg.seq_len, "seq_len")
    teacher_art = resolve_teacher(src, cfg)
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = load_model(teacher_art, device="cpu", dtype=torch.float32)
    student = load_model(src, device="cpu", dtype=torch.float32)
    check_same_tokenizer(teacher_art.path, src.path, teacher, student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(src.path)
    data_path = text_path(cfg.data)
    train_ids, heldout, digest = split_stream(tok, data_path, cfg.holdout)
    train_chunks = chunk(train_ids, cfg.seq_len)
    if len(train_chunks) < cfg.batch_size:
        raise ConfigError(f"'{data_path}' gives only {len(train_chunks)} training sequences of {cfg.seq_len} tokens",
                          "use more text, or a smaller seq_len / batch_size")
    # the reported numbers use the whole held-out split; eval_max_tokens only caps the in-training evaluations
    teacher_ppl = heldout_perplexity(teacher, tok, heldout)
    student_ppl = heldout_perplexity(student, tok, heldout)
    ckdir = checkpoint_dir(out)
    ckdir.mkdir(parents=True, exist_ok=True)
    ckpt = ckdir / f"distill-{_run_key(teacher_art, src, cfg)}.pt"

    def eval_fn(model) -> float:
        model.eval()
        return heldout_perplexity(model, tok, heldout, cfg.eval_max_tokens).perplexity

    with progress("distill steps", total=cfg.steps, enabled=show_progress) as update:
        run = train(student, teacher, train_chunks, eval_fn, cfg, ckpt, on_step=update)
    with progress("distill: held-out perplexity and KL to the teacher (all held-out tokens)",
                  enabled=show_progress) as update:
        after = heldout_perplexity(student, tok, heldout, progress=update)
        kl = kl_to_teacher(student, teacher, heldout, cfg.seq_len)
    metrics = {
        "teacher": str(teacher_art.path), "teacher_ppl": round(teacher_ppl.perplexity, 6),
        "ppl_before": round(student_ppl.perplexity, 6), "ppl_after": round(after.perplexity, 6),
        "ratio_to_teacher": round(after.perplexity / teacher_ppl.perplexity, 4),
        "kl_to_teacher": round(kl, 5),
        "steps": run["step"], "best_step": run["best_step"], "stopped": run["stopped"],
        "resumed_from_step": run["resumed_from"], "train_seconds": round(run["train_seconds"], 1),
        "train_cpu_seconds": round(run.get("train_cpu_seconds", 0.0), 1), "threads": torch.get_num_threads(),
        "tokens_seen": run["tokens_seen"], "train_tokens": len(train_ids), "teacher_cache": run["teacher_cache"],
        "curve": run["curve"], "params": sum(p.numel() for p in student.parameters()),
        "ppl_protocol": {**after.protocol, "text": data_path.name, "text_sha256": digest,
                         "split": f"last {cfg.holdout:.0%} of the token stream"},
    }
    with ArtifactWriter(out, force=force, inputs=[src.path, teacher_art.path]) as w:
        save_model(student, w.path, tokenizer_from=src.path)
        metrics["bytes"] = weight_bytes(w.path)
        if cfg.task:
            from edgepack.tasks import stage_task_metrics

            metrics["task"] = stage_task_metrics(src, Artifact(w.path, {"format": "hf"}, False), cfg.task,
                                                 cfg.task_samples, cfg.max_task_drop)
        rec = stage_record("distill", asdict(cfg), time.perf_counter() - t0, metrics,
                           target=target.name if target is not None else None, parent=src.digest())
        art = w.commit(format="hf", record=rec, parent=src, base_model=src.base_model)
    shutil.rmtree(ckdir, ignore_errors=True)
    return art
