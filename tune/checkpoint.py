"""Resumable training checkpoints for stage `tune`: the LoRA weights, the best LoRA weights so far, the optimizer
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


def save_checkpoint(ckdir: Path, model, optimizer, state: dict, best_lora: dict | None) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = ckdir / f".tmp-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(tmp / "adapter.safetensors"))
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
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    latest = ckdir / "latest"
    set_peft_model_state_dict(model, load_file(str(latest / "adapter.safetensors")))
    blob = torch.load(latest / "optimizer.pt", weights_only=True)  # our own file; weights_only refuses code
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    best = latest / "best_adapter.safetensors"
    return json.loads((latest / "state.json").read_text()), (load_file(str(best)) if best.is_file() else None)




def read_state(ckdir: Path) -> dict | None:
    p = Path(ckdir) / "latest" / "state.json"
    return json.loads(p.read_text()) if p.is_file() else None
