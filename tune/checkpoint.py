"""Resumable training checkpoints for stage `tune`: the trained weights (a peft model's LoRA weights, or the unfrozen
parameters of a full run), the best of them so far, the optimizer
state, the torch RNG state and the loop state (step, early-stopping counters, loss curve) as JSON. A checkpoint is
written into a temporary folder and renamed to `latest`, so a crash mid-write leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path


def fingerprint(src_digest: str, data_digest: str, cfg) -> str:
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "save_every", "data", "threads")}
    blob = json.dumps({"base": src_digest, "data": data_digest, "config": keep}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.checkpoints"


def trainable_state(model) -> dict:
    """{name: CPU copy} of what trains: the adapter of a peft model, else every parameter with requires_grad."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model)
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


def load_trainable_state(model, sd: dict) -> None:
    import torch

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, sd)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def save_checkpoint(ckdir: Path, model, optimizer, state: dict, best_lora: dict | None) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = ckdir / f".tmp-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "adapter.safetensors"))
    if best_lora is not None:
        save_file(best_lora, str(tmp / "best_adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    final = ckdir / "latest"
    old = ckdir / ".old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckdir: Path, model, optimizer) -> tuple[dict, dict | None]:
    import torch
    from safetensors.torch import load_file

    latest = ckdir / "latest"
    load_trainable_state(model, load_file(str(latest / "adapter.safetensors")))
    blob = torch.load(latest / "optimizer.pt", weights_only=True)  # our own file; weights_only refuses code
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    best = latest / "best_adapter.safetensors"
    return json.loads((latest / "state.json").read_text()), (load_file(str(best)) if best.is_file() else None)




def read_state(ckdir: Path) -> dict | None:
    p = Path(ckdir) / "latest" / "state.json"
    return json.loads(p.read_text()) if p.is_file() else None
