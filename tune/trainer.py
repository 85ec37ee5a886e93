"""The training loop behind stage `tune` (distillation has its own in compress/distill.py; both share
tune.schedule): AdamW on the LoRA parameters, linear warm-up + cosine schedule, gradient
accumulation, clipping, validation perplexity every `eval_every` steps with early stopping (the best adapter is
restored at the end), resumable checkpoints and TensorBoard scalars. Runs through `accelerate`, so under
`accelerate launch` each process takes its own shard of every batch and only the main process writes files.

Data order is a pure function of (seed, position in the stream): epoch e visits the training blocks in a seeded
permutation, and optimizer step s reads positions [s * accum * world * batch, ...). A resumed run therefore sees
exactly the batches an uninterrupted run would have seen, and (with the restored RNG) computes the same weights.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgepack.errors import ConfigError
from edgepack.tune.schedule import warmup_cosine

if TYPE_CHECKING:  # a type only: the stage (tune.qlora) imports this loop, not the other way round
    from edgepack.tune.qlora import TuneConfig


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    stopped: str  # "steps" | "early_stop" | "time_limit"
    best_step: int
    best_val_ppl: float
    start_val_ppl: float  # validation perplexity before the first step (the adapter starts as a no-op)
    train_seconds: float  # wall time inside the loop, summed over resumed runs (evaluations included)
    train_cpu_seconds: float  # CPU time of this process inside the loop (wall / CPU shows contention on a shared CPU)
    trained_tokens: int  # input tokens seen by optimizer steps (all processes)
    resumed_from: int | None
    curve: list[dict] = field(default_factory=list)  # per evaluation: step, train_loss, val_ppl, lr


class BatchOrder:
    """Indices of the training blocks for a given position in an endless, per-epoch shuffled stream."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed, self._perms = n_blocks, seed, {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + count)]


def train(model, blocks: dict, cfg: TuneConfig, ckdir: Path, fp: str, accelerator, *, resume: bool,
          on_step=None, log_dir: Path | None = None, val_fn=None) -> TrainResult:
    """Train the trainable parameters of `model` (a peft model's LoRA weights, or those a full run left unfrozen)
    in place on blocks["train"]; returns what happened. val_fn(model) -> validation perplexity replaces the default
    (masked perplexity of blocks["validation"]), e.g. for a mix of sources."""
    import torch

    from edgepack.tune.checkpoint import load_checkpoint, load_trainable_state, save_checkpoint, trainable_state

    torch.set_grad_enabled(True)  # edgepack.hf.load_model turns autograd off process-wide for inference
    train_ids, train_labels = blocks["train"]
    val_ids, val_labels = blocks["validation"]
    if train_ids.shape[0] == 0:
        raise ConfigError("the training split is empty after packing", "use more data")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"fingerprint": fp, "step": 0, "best_val_ppl": math.inf, "best_step": 0, "bad_evals": 0,
             "train_seconds": 0.0, "train_cpu_seconds": 0.0, "trained_tokens": 0, "curve": [], "start_val_ppl": None}
    best_lora, resumed_from = None, None
    if resume:
        state, best_lora = load_checkpoint(ckdir, model, optimizer)
        resumed_from = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    tb = _tensorboard(log_dir) if (main and log_dir is not None) else None
    order = BatchOrder(train_ids.shape[0], cfg.seed)

    def lora_state() -> dict:
        return trainable_state(accelerator.unwrap_model(model))

    def evaluate() -> float:
        if val_fn is not None:
            return val_fn(model)  # masked_perplexity restores train mode
        return masked_perplexity(model, val_ids, val_labels, cfg.batch_size, cfg.eval_blocks)

    if state["start_val_ppl"] is None:
        state["start_val_ppl"] = state["best_val_ppl"] = evaluate()
        state["curve"].append({"step": 0, "train_loss": None, "val_ppl": round(state["start_val_ppl"], 4), "lr": 0.0})
        best_lora = lora_state()
    stopped, losses = "steps", []
    t_run, c_run = time.perf_counter(), time.process_time()
    model.train()
    while state["step"] < cfg.steps:
        s = state["step"]
        lr = cfg.lr * warmup_cosine(s, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = []
        for m in range(cfg.grad_accum):
            start = ((s * cfg.grad_accum + m) * world + rank) * cfg.batch_size
            idx = order.indices(start, cfg.batch_size)
            micro.append((train_ids[idx], train_labels[idx]))
        n_items = sum(int((y[:, 1:] != -100).sum()) for _, y in micro)  # loss = sum over the step / tokens in it
        step_loss = 0.0
        for m, (x, y) in enumerate(micro):
            sync = accelerator.no_sync(model) if m < len(micro) - 1 else nullcontext()
            with sync:
                out = model(input_ids=x.to(device), labels=y.to(device), num_items_in_batch=max(1, n_items),
                            use_cache=False)
                accelerator.backward(out.loss)
            step_loss += float(out.loss.detach())
        grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = s + 1
        state["trained_tokens"] += cfg.grad_accum * cfg.batch_size * world * train_ids.shape[1]
        losses.append(step_loss)
        if tb:
            tb.add_scalar("train/loss", step_loss, s + 1)
            tb.add_scalar("train/lr", lr, s + 1)
            tb.add_scalar("train/grad_norm", grad_norm, s + 1)
        elapsed = state["train_seconds"] + time.perf_counter() - t_run
        out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps or out_of_time:
            ppl = evaluate()
            state["curve"].append({"step": s + 1, "train_loss": round(sum(losses) / len(losses), 5),
                                   "val_ppl": round(ppl, 4), "lr": lr, "seconds": round(elapsed, 1)})
            losses = []
            if tb:
                tb.add_scalar("validation/perplexity", ppl, s + 1)
                tb.flush()
            if ppl < state["best_val_ppl"] * (1 - 1e-4):
                state.update(best_val_ppl=ppl, best_step=s + 1, bad_evals=0)
                best_lora = lora_state()
            else:
                state["bad_evals"] += 1
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stopped = "early_stop"
        if (s + 1) % cfg.save_every == 0 and main and stopped == "steps" and s + 1 < cfg.steps:
            state["train_seconds"] += time.perf_counter() - t_run
            state["train_cpu_seconds"] += time.process_time() - c_run
            t_run, c_run = time.perf_counter(), time.process_time()
            save_checkpoint(ckdir, accelerator.unwrap_model(model), optimizer, state, best_lora)
        if on_step is not None:
            on_step(s + 1, cfg.steps, {"loss": step_loss, "lr": lr})
        if stopped != "steps":
            break
        if out_of_time:
            stopped = "time_limit"
            break
    state["train_seconds"] += time.perf_counter() - t_run
    state["train_cpu_seconds"] += time.process_time() - c_run
    if tb:
        tb.close()
    if best_lora is not None and state["best_step"] != state["step"]:
        load_trainable_state(accelerator.unwrap_model(model), best_lora)  # early stopping keeps the best
    accelerator.wait_for_everyone()
    return TrainResult(state["step"], stopped, state["best_step"], state["best_val_ppl"], state["start_val_ppl"],
                       state["train_seconds"], state["train_cpu_seconds"], state["trained_tokens"], resumed_from,
                       state["curve"])


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the `tune` extra; without it the curve is still in the manifest
        return None
    return SummaryWriter(str(log_dir))


def masked_perplexity(model, ids, labels, batch_size: int, limit: int | None = None) -> float:
    """exp(mean NLL) over label != -100 tokens of packed blocks [N, T] (each label predicted from the tokens before)."""
    import torch

    n = ids.shape[0] if limit is None else min(limit, ids.shape[0])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x, y = ids[i:min(i + batch_size, n)].to(device), labels[i:min(i + batch_size, n)].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            tgt = y[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            count += int((tgt != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ConfigError("the validation split has no tokens that carry loss", "use more data or a smaller seq_len")
    return math.exp(nll / count)
