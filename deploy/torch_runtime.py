"""Runtimes on plain PyTorch + transformers: `torch-cpu` (eager with a KV cache) and `hf`, which runs
transformers' own `generate` machinery as the honest baseline that bench compares against."""

from __future__ import annotations

import numpy as np

from edgepack.deploy.runtime import process_rss_bytes


class TorchRuntime:
    """Eager transformers forward with a DynamicCache. Float32 on CPU."""

    name = "torch-cpu"

    def __init__(self, model, threads: int | None = None):
        import torch

        from edgepack.deploy.runtime import choose_threads

        n, self.threads_why = choose_threads(threads)
        torch.set_num_threads(n)
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None
        self.threads = torch.get_num_threads()

    def reset(self) -> None:
        self.cache = None

    def _run(self, ids: np.ndarray) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(ids)).to(self.device), past_key_values=self.cache,
                             use_cache=True)
        return out.logits[:, -1].float().cpu().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.reset()
        return self._run(np.asarray(ids, dtype=np.int64))

    def decode_step(self, ids: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(ids, dtype=np.int64).reshape(-1, 1))

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device), use_cache=False)
        return out.logits.float().cpu().numpy()

    def memory_report(self) -> dict:
        rep = {"rss_bytes": process_rss_bytes()}
        if self.device.type == "cuda":
            import torch

            rep["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return rep

    def describe(self) -> dict:
        import torch

        return {"runtime": self.name, "device": str(self.device), "threads": self.threads,
                "threads_why": self.threads_why, "torch": torch.__version__}


def open_torch_runtime(art, threads: int | None = None, device: str = "cpu", **_):
    from edgepack.hf import load_model

    return TorchRuntime(load_model(art, device=device), threads)


class HFGenerateBaseline(TorchRuntime):
    """Plain `model.generate` (greedy), for bench's --baseline hf. prefill/decode_step are those of TorchRuntime;
    `hf_generate` times transformers' own loop end to end."""

    name = "hf"

    def hf_generate(self, ids: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, float]:
        import time

        import torch

        x = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.model.config.eos_token_id)
        return out[:, x.shape[1]:].cpu().numpy(), time.perf_counter() - t0


def open_hf_baseline(art, threads: int | None = None, device: str = "cpu", **_):
    from edgepack.hf import load_model

    return HFGenerateBaseline(load_model(art, device=device), threads)
