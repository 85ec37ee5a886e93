"""The FastAPI application of `edgepack serve` (see deploy/serve.py for the engine, limits and metrics).

OpenAI request/response shapes: https://platform.openai.com/docs/api-reference (completions, chat, streaming as
server-sent events ending with `data: [DONE]`). presence_penalty, frequency_penalty and logit_bias are applied with
OpenAI's definitions (deploy/generation.py adjust_logits). Parameters we cannot honour (n > 1, echo, logprobs,
best_of > 1, tools / functions) are refused with 400 rather than silently ignored; unknown extra fields are ignored,
as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgepack.deploy.generation import GenerationConfig
from edgepack.deploy.serve_engine import Engine, ServeConfig, Served, constant_time_equal, new_id, prometheus_text

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type_, param, code, headers


def _error_body(message, type_, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    logprobs: bool | int | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with token counts
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None  # refused: this server does not call tools
    functions: list | None = None  # the deprecated form of tools: refused too


class _Counter:
    """A pure ASGI wrapper counting responses by endpoint and status (BaseHTTPMiddleware would buffer streams)."""

    def __init__(self, app, http: dict):
        self.app, self.http = app, http

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_)
        finally:
            ep = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.http["count"][(ep, status["code"])] = self.http["count"].get((ep, status["code"]), 0) + 1
            self.http["seconds"][ep] = self.http["seconds"].get(ep, 0.0) + time.perf_counter() - t0


class _Guard:
    """A pure ASGI wrapper for what must happen before FastAPI parses anything: the API key (401 before the body is
    read), and the body size (413 above cfg.max_body_bytes; the body must arrive within cfg.header_timeout_s, else
    408). The body it read is replayed to the app; after that `receive` is the server's own (disconnects)."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        if self.cfg.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            got = headers.get("authorization", "")
            if not (got.startswith("Bearer ") and constant_time_equal(got[7:], self.cfg.api_key)):
                return await _reply(scope, send, 401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                    "authentication_error", code="invalid_api_key")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.cfg.max_body_bytes
        too_big = f"the request body is larger than this server's limit of {limit} bytes"
        if not headers.get("content-length", "0").isdigit():
            return await _reply(scope, send, 400, "Content-Length is not a number")
        if int(headers.get("content-length", "0")) > limit:
            return await _reply(scope, send, 413, too_big, code="body_too_large")
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.cfg.header_timeout_s):
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > limit:
                        return await _reply(scope, send, 413, too_big, code="body_too_large")
        except TimeoutError:
            return await _reply(scope, send, 408, f"the request body did not arrive within "
                                f"{self.cfg.header_timeout_s:g} s", code="timeout")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(scope, send, status, message, type_="invalid_request_error", code=None):
    async def no_body():
        return {"type": "http.disconnect"}

    await JSONResponse(_error_body(message, type_, None, code), status)(scope, no_body, send)


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client of a non-streamed request goes away (the worker then stops at its next token)."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.1)


def create_app(served: Served, cfg: ServeConfig):
    """The ASGI application (FastAPI inside a response counter)."""
    app = FastAPI(title="edgepack serve", docs_url=None, redoc_url=None, openapi_url=None)
    http = {"count": {}, "seconds": {}}
    state: dict = {}

    device_sampling = any(hasattr(rt, "generate_on_device") for rt in list(served.pool.queue))

    def engine() -> Engine:  # created on first use, inside the server's event loop
        if "engine" not in state:
            state["engine"] = Engine(served, cfg)
        return state["engine"]

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid" or (not where and first.get("type") in ("dict_type", "model_attributes_type")):
            msg = "the request body must be a JSON object (send Content-Type: application/json)"
        else:
            msg = f"{where or 'body'}: {first.get('msg', 'invalid')}" + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else "")
        return JSONResponse(_error_body(msg, "invalid_request_error", where or None), 400)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a runtime failure: an OpenAI-shaped 500, the server keeps running
        return JSONResponse(_error_body(f"generation failed: {type(exc).__name__}: {exc}", "server_error"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    @app.get("/health")
    async def health():
        e = engine()
        return {"status": "ok", "model": served.model_id, "runtime": served.runtime, "context": served.context,
                "running": e.active, "queued": e.waiting, "max_concurrency": cfg.max_concurrency, "queue": cfg.queue}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine(), http, served), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": served.model_id, "object": "model", "created": int(getattr(app.state, "started", time.time())),
                "owned_by": "edgepack"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != served.model_id:
            raise ApiError(404, f"model '{model_id}' does not exist (this server serves '{served.model_id}')",
                           code="model_not_found")
        return model_card()

    def prepare(req: _Sampling, ids: list[int], max_tokens: int | None, default: int):
        if req.model is not None and req.model != served.model_id:
            raise ApiError(404, f"model '{req.model}' does not exist (this server serves '{served.model_id}')",
                           "invalid_request_error", "model", "model_not_found")
        if req.n not in (None, 1):
            raise ApiError(400, "n must be 1 (one completion per request)", param="n")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        room = served.context - len(ids)
        if max_tokens is None:
            max_tokens = max(1, min(default, served.cap, room))
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1 (got {max_tokens})", param="max_tokens")
        if max_tokens > served.cap:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's cap of {served.cap}",
                           param="max_tokens")
        if len(ids) + max_tokens > served.context:
            raise ApiError(400, f"This model's maximum context length is {served.context} tokens. However, you "
                           f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for "
                           "the completion). Please reduce the prompt or max_tokens.", param="prompt",
                           code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")
        for name in ("tools", "functions"):
            if getattr(req, name, None):
                raise ApiError(400, f"{name} are not supported by this server (it does not call tools)", param=name)
        bias = []
        for key, value in (req.logit_bias or {}).items():
            if not key.strip().isdigit() or not 0 <= int(key) < len(served.tokenizer) or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: '{key}': {value} must map a token id in [0, "
                               f"{len(served.tokenizer)}) to a bias in [-100, 100]", param="logit_bias")
            bias.append((int(key), float(value)))
        temp = 1.0 if req.temperature is None else req.temperature
        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temp, top_p=req.top_p or 1.0, seed=req.seed,
                               stop_token_ids=served.eos, presence_penalty=req.presence_penalty or 0.0,
                               frequency_penalty=req.frequency_penalty or 0.0, logit_bias=tuple(sorted(bias)))
        if gen.adjusts_logits and device_sampling:
            raise ApiError(400, f"presence_penalty, frequency_penalty and logit_bias are not implemented for the "
                           f"{served.runtime} runtime (it samples on the GPU)", param="logit_bias")
        e = engine()
        if e.full():
            e.metrics["rejected_queue_full"] += 1
            raise ApiError(429, f"server busy: {cfg.max_concurrency} running and {cfg.queue} queued; retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        return gen, stops

    def too_long(n_chars: int) -> None:
        if not served.chars_fit(n_chars):  # before tokenizing: a huge prompt must not cost a tokenizer pass
            raise ApiError(400, f"This model's maximum context length is {served.context} tokens, and a prompt of "
                           f"{n_chars} characters cannot fit in it. Please reduce the prompt.", param="prompt",
                           code="context_length_exceeded")

    def tokenize_prompt(req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request (got a list of several)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            too_long(len(p))
            return list(served.tokenizer(p)["input_ids"])
        vocab = len(served.tokenizer)
        if not p or any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})", param="prompt")
        return list(p)

    def chat_ids(req: ChatRequest) -> list[int]:
        msgs = []
        for i, m in enumerate(req.messages):
            if m.role not in ("system", "user", "assistant", "developer", "tool"):
                raise ApiError(400, f"messages[{i}].role '{m.role}' is not a chat role", param=f"messages.{i}.role")
            if isinstance(m.content, list):
                if any(part.get("type") != "text" for part in m.content):
                    raise ApiError(400, f"messages[{i}]: only text content is supported", param=f"messages.{i}.content")
                content = "".join(str(part.get("text", "")) for part in m.content)
            else:
                content = m.content or ""
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        too_long(sum(len(m["content"]) + len(m["role"]) for m in msgs))
        tok = served.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        # a base model without a chat template: a plain transcript the model continues after "assistant:"
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return list(tok(text)["input_ids"])

    async def run(req, ids, gen, stops, kind: str, request: Request):
        e = engine()
        created, rid = int(time.time()), new_id("cmpl" if kind == "text" else "chatcmpl")
        if not req.stream:
            cancel = threading.Event()
            watcher = asyncio.create_task(_watch_disconnect(request, cancel))
            try:
                await e.admit()
                out = await e.start(ids, gen, stops, None, cancel)
            finally:
                watcher.cancel()
            usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                     "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
            if kind == "text":
                choice = {"text": out["text"], "index": 0, "logprobs": None, "finish_reason": out["finish_reason"]}
                return {"id": rid, "object": "text_completion", "created": created, "model": served.model_id,
                        "choices": [choice], "usage": usage}
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                      "finish_reason": out["finish_reason"]}
            return {"id": rid, "object": "chat.completion", "created": created, "model": served.model_id,
                    "choices": [choice], "usage": usage}

        await e.admit()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        fut = e.start(ids, gen, stops, lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p), cancel)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        obj = "text_completion" if kind == "text" else "chat.completion.chunk"

        def chunk(piece, finish, first=False):
            if kind == "text":
                c = {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "delta": ({"role": "assistant"} if first else {}) | ({"content": piece} if piece else {}),
                     "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": served.model_id,
                                          "choices": [c]}) + "\n\n"

        async def events():
            try:
                if kind == "chat":
                    yield chunk("", None, first=True)
                while (piece := await pieces.get()) is not None:
                    yield chunk(piece, None)
                try:
                    out = fut.result()
                except Exception as exc:  # a runtime failure mid-stream: say so in the stream, then end it
                    yield "data: " + json.dumps(_error_body(f"generation failed: {exc}", "server_error")) + "\n\n"
                    return
                yield chunk("", out["finish_reason"])
                if (req.stream_options or {}).get("include_usage"):
                    usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                             "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                                 "model": served.model_id, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # no-op when finished; stops the worker when the client went away

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.echo:
            raise ApiError(400, "echo is not supported by this server", param="echo")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1", param="best_of")
        ids = await asyncio.to_thread(tokenize_prompt, req)  # off the event loop: /health stays responsive
        gen, stops = prepare(req, ids, req.max_tokens, cfg.default_max_tokens)
        return await run(req, ids, gen, stops, "text", request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        ids = await asyncio.to_thread(chat_ids, req)
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen, stops = prepare(req, ids, mt, served.cap)
        return await run(req, ids, gen, stops, "chat", request)

    app.state.started = time.time()
    outer = _Counter(_Guard(app, cfg), http)
    # on shutdown: in-flight generations end at their next token, so their responses finish within the graceful
    # shutdown instead of being cancelled mid-response (an ASGI traceback) and holding the exit on worker threads
    outer.stop_generations = lambda: state["engine"].stop() if "engine" in state else None
    return outer
