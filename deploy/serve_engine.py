"""What the OpenAI-compatible server serves, without the HTTP layer: its settings (ServeConfig), the loaded model
(load_served: a bundle or an artifact), and the Engine that admits, queues and runs generations. deploy/serve_api.py
maps HTTP onto it (FastAPI); deploy/serve.py runs that app under uvicorn.

    POST /v1/completions, /v1/chat/completions (both with "stream": true -> server-sent events)
    GET  /v1/models, /health (no key needed), /metrics (Prometheus text format)

Generation goes through deploy.runtime.open_runtime + deploy.generation.generate only, so what is served is what
bench measured. Each of --max-concurrency slots owns one runtime (a runtime holds a KV cache, so it serves one
request at a time); up to --queue more requests wait for a slot, and anything beyond gets 429 with Retry-After at
once rather than piling up. Requests are checked before they queue: prompt + max_tokens against the context length,
max_tokens against the cap, sampling values in range. Errors use OpenAI's JSON shape {"error": {...}}.
"""

from __future__ import annotations

import asyncio
import hmac
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import ArtifactError, ConfigError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only unless the user asks otherwise
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"
    max_concurrency: int = 1  # generations running at once (one runtime each)
    queue: int = 8  # requests allowed to wait for a slot; more -> 429
    max_tokens_cap: int | None = None  # None: the bundle's runtime.json value, else 512 (tokens)
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    model_name: str | None = None  # id in /v1/models [default: bundle id or artifact directory name]
    runtime: str | None = None  # None: the bundle's / artifact's own
    threads: int | None = None  # CPU threads per runtime
    max_body_bytes: int = 4 << 20  # request bodies above this get 413 before anything parses them (bytes)
    header_timeout_s: float = 10.0  # a connection without a complete request head after this long is closed (s)

    def validate(self) -> list[str]:
        errs = []
        if not 0 < self.port < 65536:
            errs.append("port must be in 1..65535")
        if self.max_concurrency < 1:
            errs.append("max_concurrency must be >= 1")
        if self.queue < 0:
            errs.append("queue must be >= 0")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            errs.append("max_tokens_cap must be >= 1")
        if self.api_key is not None and len(self.api_key) < 8:
            errs.append("api_key must be at least 8 characters")
        if self.threads is not None and self.threads < 1:
            errs.append("threads must be >= 1")
        if self.max_body_bytes < 1024:
            errs.append("max_body_bytes must be >= 1024")
        if not self.header_timeout_s > 0:
            errs.append("header_timeout_s must be > 0 (seconds)")
        return errs


@dataclass
class Served:
    """What the server runs: the artifact, its tokenizer, limits and a pool of runtimes."""

    model_id: str
    art: object
    tokenizer: object
    context: int
    cap: int
    runtime: str
    pool: queue.Queue
    eos: tuple[int, ...]
    max_token_chars: int = 64  # the longest token's text: a prompt longer than context x this cannot fit

    def chars_fit(self, n_chars: int) -> bool:
        """Whether a text of n_chars could fit the context at all (checked before tokenizing it)."""
        return n_chars <= self.context * self.max_token_chars


def load_served(path, cfg: ServeConfig, workdir=None) -> Served:
    """A bundle directory or .tar (verified; a .tar is unpacked safely under workdir), or an artifact directory."""
    from edgepack.deploy.bundle import open_runnable
    from edgepack.deploy.runtime import open_runtime, resolve_runtime
    from edgepack.facts import context_length
    from edgepack.hf import load_tokenizer

    path = Path(path)
    art, tok_dir, manifest, rcfg = open_runnable(path, workdir)
    if manifest is not None:
        model_id, runtime = manifest["bundle_id"], cfg.runtime or manifest["runtime"]
        context, cap = rcfg.get("context"), cfg.max_tokens_cap or rcfg.get("max_tokens_cap") or 512
    else:
        model_id, runtime = path.name, resolve_runtime(art, cfg.runtime)
        context, cap = None, cfg.max_tokens_cap or 512
    if context is None:
        context = context_length(art)
    if not context:
        raise ArtifactError(f"'{path}': cannot tell the model's context length", "set 'context' in the artifact's extra")
    tok = load_tokenizer(tok_dir)
    pool: queue.Queue = queue.Queue()
    for _ in range(cfg.max_concurrency):
        pool.put(open_runtime(art, runtime, threads=cfg.threads))
    eos = tok.eos_token_id
    longest = max((len(t) for t in tok.get_vocab()), default=1)
    return Served(cfg.model_name or model_id, art, tok, int(context), int(cap), runtime, pool,
                  tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else (), max(1, longest))


class _Stop(Exception):
    """A stop string appeared."""


class _Cancelled(Exception):
    """The client went away mid-stream."""


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (not streamed yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class Engine:
    """Admission (slots + bounded queue) and generation on a worker thread per slot."""

    def __init__(self, served: Served, cfg: ServeConfig):
        self.s, self.cfg = served, cfg
        self.slots = asyncio.Semaphore(cfg.max_concurrency)
        self.executor = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="edgepack-gen")
        self.active = self.waiting = 0
        self.lock = threading.Lock()  # worker threads update the counters below
        self.metrics = {"prompt_tokens": 0, "completion_tokens": 0, "rejected_queue_full": 0, "ttft_sum": 0.0,
                        "ttft_count": 0, "decode_tokens": 0, "decode_seconds": 0.0, "cancelled": 0, "peak_queued": 0}
        self.stopping = threading.Event()  # the server is shutting down: every generation ends at its next token

    def stop(self) -> None:
        self.stopping.set()

    def full(self) -> bool:
        return self.active + self.waiting >= self.cfg.max_concurrency + self.cfg.queue

    async def admit(self) -> None:
        """Wait for a slot; the caller has checked full() (same event-loop tick: no race) ."""
        self.waiting += 1
        in_flight_beyond_slots = self.active + self.waiting - self.cfg.max_concurrency
        self.metrics["peak_queued"] = max(self.metrics["peak_queued"], in_flight_beyond_slots)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self, _fut=None) -> None:
        self.active -= 1
        self.slots.release()

    def start(self, ids, gen_cfg, stops, on_piece=None, cancel: threading.Event | None = None) -> asyncio.Future:
        """Run one generation on a worker thread; the slot is released when the thread is done (not before)."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._work, ids, gen_cfg, stops, on_piece, cancel)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self.release))
        return fut

    def _work(self, ids, gen_cfg, stops, on_piece, cancel) -> dict:
        from edgepack.deploy.generation import generate

        tok = self.s.tokenizer
        rt = self.s.pool.get()
        toks: list[int] = []
        state = {"emitted": "", "finish": "length"}

        def on_token(nxt):
            if (cancel is not None and cancel.is_set()) or self.stopping.is_set():
                raise _Cancelled
            t = int(nxt[0])
            if t in self.s.eos:
                return
            toks.append(t)
            text = tok.decode(toks, skip_special_tokens=True)
            for s in stops:
                i = text.find(s)
                if i >= 0:
                    self._emit(text[:i], state, on_piece)
                    raise _Stop
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                return
            self._emit(text[:len(text) - _held_back(text, stops)], state, on_piece)

        t0 = time.perf_counter()
        try:
            if cancel is not None and cancel.is_set():  # the client left while it waited for a slot: no prefill
                raise _Cancelled
            res = generate(rt, ids, gen_cfg, on_token=on_token)
            state["finish"] = "stop" if res.stopped == "stop_token" else "length"
            self._emit(tok.decode(toks, skip_special_tokens=True), state, on_piece)
            ttft, lat = res.ttft_s, res.token_latencies_s
        except _Stop:
            state["finish"], ttft, lat = "stop", None, []
        except _Cancelled:
            state["finish"], ttft, lat = "cancelled", None, []
        finally:
            self.s.pool.put(rt)
        with self.lock:
            m = self.metrics
            m["cancelled"] += state["finish"] == "cancelled"
            m["prompt_tokens"] += len(ids)
            m["completion_tokens"] += len(toks)
            if ttft is not None:
                m["ttft_sum"] += ttft
                m["ttft_count"] += 1
                m["decode_tokens"] += len(lat)
                m["decode_seconds"] += sum(lat)
        return {"text": state["emitted"], "finish_reason": state["finish"], "prompt_tokens": len(ids),
                "completion_tokens": len(toks), "seconds": time.perf_counter() - t0}

    @staticmethod
    def _emit(text: str, state: dict, on_piece) -> None:
        if len(text) > len(state["emitted"]) and text.startswith(state["emitted"]):
            piece = text[len(state["emitted"]):]
            state["emitted"] = text
            if on_piece:
                on_piece(piece)


def prometheus_text(engine: Engine, http: dict, served: Served) -> str:
    """Counters and gauges in the Prometheus text exposition format (version 0.0.4)."""
    m, lines = engine.metrics, []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    metric("edgepack_http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
           [({"endpoint": e, "status": str(c)}, n) for (e, c), n in sorted(http["count"].items())] or [({}, 0)])
    metric("edgepack_http_request_duration_seconds_sum", "counter", "Total seconds spent answering, by endpoint.",
           [({"endpoint": e}, round(v, 6)) for e, v in sorted(http["seconds"].items())] or [({}, 0)])
    metric("edgepack_rejected_total", "counter", "Requests refused with 429 because every slot and queue place was taken.",
           [({"reason": "queue_full"}, m["rejected_queue_full"])])
    metric("edgepack_cancelled_total", "counter", "Streams whose client went away before the end.", [({}, m["cancelled"])])
    metric("edgepack_prompt_tokens_total", "counter", "Prompt tokens processed.", [({}, m["prompt_tokens"])])
    metric("edgepack_completion_tokens_total", "counter", "Tokens generated and returned.", [({}, m["completion_tokens"])])
    lines += ["# HELP edgepack_time_to_first_token_seconds Prefill plus first token, per request.",
              "# TYPE edgepack_time_to_first_token_seconds summary"]
    lines.append(f"edgepack_time_to_first_token_seconds_sum {round(m['ttft_sum'], 6)}")
    lines.append(f"edgepack_time_to_first_token_seconds_count {m['ttft_count']}")
    metric("edgepack_decode_seconds_total", "counter", "Seconds spent in decode steps.", [({}, round(m["decode_seconds"], 6))])
    metric("edgepack_decode_tokens_total", "counter", "Decode steps run (tokens after the first).", [({}, m["decode_tokens"])])
    metric("edgepack_requests_running", "gauge", "Generations running now.", [({}, engine.active)])
    metric("edgepack_requests_queued", "gauge", "Requests waiting for a slot now.", [({}, engine.waiting)])
    metric("edgepack_requests_queued_peak", "gauge", "Most requests ever waiting for a slot at once.",
           [({}, m["peak_queued"])])
    metric("edgepack_max_concurrency", "gauge", "Generation slots.", [({}, engine.cfg.max_concurrency)])
    metric("edgepack_queue_capacity", "gauge", "Requests that may wait for a slot.", [({}, engine.cfg.queue)])
    metric("edgepack_model_info", "gauge", "The served model.", [({"model": served.model_id, "runtime": served.runtime,
                                                                    "context": str(served.context)}, 1)])
    return "\n".join(lines) + "\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_config(cfg: ServeConfig) -> None:
    errs = cfg.validate()
    if errs:
        raise ConfigError("serve settings: " + "; ".join(errs), "change the values named (each says what it must be)")


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
