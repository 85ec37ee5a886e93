"""`edgepack serve` with the real stories260K bundle: the official openai client (completions, chat, streaming),
32 concurrent clients (every request answered or deliberately refused with 429), malformed requests (clear 4xx,
server stays up), API key, metrics. Servers bind 127.0.0.1 on a free port and stop at teardown."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest
from conftest import STORIES

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'edgepack[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'edgepack[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx (serve extra)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from edgepack.deploy.generation import GenerationConfig, generate  # noqa: E402
from edgepack.deploy.serve import BackgroundServer  # noqa: E402
from edgepack.deploy.serve_engine import ServeConfig, load_served  # noqa: E402

PROMPTS = ["Once upon a time", "The cat sat", "Lily was happy because", "One day, a big dog"]
KEY = "test-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from edgepack.deploy.bundle import BundleConfig, make_bundle
    from edgepack.targets import load_target

    return make_bundle(STORIES, load_target("cpu-x86-64"), tmp_path_factory.mktemp("serve") / "b.tar",
                       BundleConfig(max_tokens_cap=64))


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """Two slots, a queue deep enough for 32 clients; yields (url, served, expected greedy texts)."""
    cfg = ServeConfig(port=_free_port(), max_concurrency=2, queue=30, threads=1)
    served = load_served(bundle, cfg, tmp_path_factory.mktemp("unpacked"))
    # reference answers straight from the runtime, before any HTTP is involved
    expected = {p: served.tokenizer.decode(_greedy(served, p), skip_special_tokens=True) for p in PROMPTS}
    with BackgroundServer(served, cfg) as url:
        yield url, served, expected


def _greedy(served, prompt) -> list[int]:
    rt = served.pool.get()
    try:
        res = generate(rt, served.tokenizer(prompt)["input_ids"], GenerationConfig(max_new_tokens=6, stop_token_ids=served.eos))
    finally:
        served.pool.put(rt)
    return [t for t in res.tokens[0].tolist() if t not in served.eos]


def _client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), **kw)


def test_openai_client_completions_chat_and_streaming(server):
    url, served, expected = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [served.model_id]
    c = client.completions.create(model=served.model_id, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert c.choices[0].text == expected[PROMPTS[0]] and len(c.choices[0].text) > 5
    assert c.usage.completion_tokens == 6 and c.usage.prompt_tokens == len(served.tokenizer(PROMPTS[0])["input_ids"])
    streamed = client.completions.create(model=served.model_id, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                         stream=True)
    pieces = [ch.choices[0].text for ch in streamed]
    assert "".join(pieces) == expected[PROMPTS[0]] and len([p for p in pieces if p]) >= 3

    msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
    chat = client.chat.completions.create(model=served.model_id, messages=msgs, max_tokens=6, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length" and text
    stream = client.chat.completions.create(model=served.model_id, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6 == chat.usage.completion_tokens

    # a stop string ends the completion early, with finish_reason "stop" and the stop text left out
    word = expected[PROMPTS[0]].split()[2]
    stopped = client.completions.create(model=served.model_id, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                        stop=[" " + word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == expected[PROMPTS[0]].split(" " + word)[0]


def _metric(url, name, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1))


def test_32_concurrent_clients_all_answered_correctly(server):
    url, served, expected = server
    before = _metric(url, "edgepack_completion_tokens_total")

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        jobs = [client.completions.create(model=served.model_id, prompt=PROMPTS[i % 4], max_tokens=6, temperature=0)
                for i in range(32)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    for i, r in enumerate(results):  # every answer is the greedy text for its own prompt (no cross-talk)
        assert r.choices[0].text == expected[PROMPTS[i % 4]]
    assert _metric(url, "edgepack_completion_tokens_total") - before == sum(r.usage.completion_tokens for r in results)
    assert _metric(url, "edgepack_requests_running") == 0 and _metric(url, "edgepack_requests_queued") == 0
    assert _metric(url, "edgepack_requests_queued_peak") >= 10  # 32 at once on 2 slots: most of them queued


def test_full_queue_answers_429_and_nothing_is_lost(bundle, tmp_path):
    cfg = ServeConfig(port=_free_port(), max_concurrency=1, queue=2, threads=1, api_key=KEY)
    served = load_served(bundle, cfg, tmp_path)
    expected = {p: served.tokenizer.decode(_greedy(served, p), skip_special_tokens=True) for p in PROMPTS}
    with BackgroundServer(served, cfg) as url:
        async def main():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
            jobs = [client.completions.create(model=served.model_id, prompt=PROMPTS[i % 4], max_tokens=6,
                                              temperature=0) for i in range(32)]
            return await asyncio.gather(*jobs, return_exceptions=True)

        results = asyncio.run(main())
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(ok) + len(refused) == 32  # every request: an answer or a deliberate 429, nothing else
        assert len(ok) >= 3 and len(refused) >= 1  # 1 running + 2 queued are always admitted
        assert all(r.choices[0].text == expected[PROMPTS[i % 4]] for i, r in enumerate(results) if r in ok)
        assert all(r.response.headers.get("retry-after") == "1" for r in refused)
        assert "queue_full" in str(refused[0].body)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert _metric(url, 'edgepack_rejected_total{reason="queue_full"}', auth) == len(refused)
        # the API key guards /v1 and /metrics, not /health
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong-key-xxxx"}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health").json()["status"] == "ok"
        with pytest.raises(openai.AuthenticationError):
            _client(url, api_key="wrong-key-xxxx", max_retries=0).models.list()


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "JSON object"),
    (b"[1, 2]", 400, "JSON object"),
    ({"max_tokens": 4}, 400, "prompt: Field required"),
    ({"prompt": "hi", "max_tokens": 65}, 400, "above this server's cap of 64"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ({"prompt": list(range(3, 503)), "max_tokens": 20}, 400, "maximum context length is 512 tokens"),
    ({"prompt": [0, 99999], "max_tokens": 4}, 400, "token ids"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "n": 3}, 400, "n must be 1"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_malformed_completion_requests_get_clear_4xx(server, body, status, needle):
    url, served, expected = server
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/completions", timeout=60, **kw)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_malformed_chat_requests_and_server_stays_up(server):
    url, served, expected = server
    for body, needle in [({"messages": []}, "messages"), ({"messages": [{"content": "hi"}]}, "role"),
                         ({"messages": [{"role": "wizard", "content": "hi"}]}, "not a chat role"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text")]:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/v1/nothing-here").status_code == 404
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[PROMPTS[1]]
    assert _metric(url, 'edgepack_http_requests_total{endpoint="/v1/chat/completions",status="400"}') >= 4


def test_client_leaving_a_stream_stops_its_generation(server):
    url, served, expected = server
    before = _metric(url, "edgepack_cancelled_total")
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few events, then hang up
    assert got[0].startswith("data: {")
    deadline = time.time() + 30
    while _metric(url, "edgepack_cancelled_total") == before and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(url, "edgepack_cancelled_total") == before + 1  # the slot was freed, not run to 60 tokens
    assert _metric(url, "edgepack_requests_running") == 0


def test_an_artifact_directory_serves_too():
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from edgepack.deploy.serve_api import create_app

    cfg = ServeConfig(max_tokens_cap=32)
    served = load_served(STORIES, cfg)
    assert (served.model_id, served.context, served.cap, served.runtime) == ("stories260K", 512, 32, "torch-cpu")

    async def main():
        transport = httpx.ASGITransport(app=create_app(served, cfg))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            models = (await c.get("/v1/models")).json()
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0})
            return models, r.json()

    models, out = asyncio.run(main())
    assert models["data"][0]["id"] == "stories260K"
    assert out["choices"][0]["text"] == served.tokenizer.decode(_greedy(served, PROMPTS[3]), skip_special_tokens=True)


def test_a_runtime_failure_is_an_openai_500_and_the_slot_comes_back():
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from edgepack.deploy.serve_api import create_app

    cfg = ServeConfig()
    served = load_served(STORIES, cfg)
    real = served.pool.get()

    class FailsOnce:  # the real runtime, whose first decode step fails the way a lost device would
        failed = False

        def __getattr__(self, name):
            return getattr(real, name)

        def decode_step(self, ids):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("device lost")
            return real.decode_step(ids)

    served.pool.put(FailsOnce())
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}

    async def main():
        transport = httpx.ASGITransport(app=create_app(served, cfg), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.post("/v1/completions", json=body)), (await c.post("/v1/completions", json=body))

    bad, good = asyncio.run(main())
    assert bad.status_code == 500 and bad.json()["error"]["message"] == "generation failed: RuntimeError: device lost"
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 6
    assert good.json()["choices"][0]["text"] == served.tokenizer.decode(_greedy(served, PROMPTS[0]),
                                                                        skip_special_tokens=True)


@pytest.fixture(scope="module")
def guarded(bundle, tmp_path_factory):
    """One slot, an API key, a 1 s header timeout, a 64 KiB body limit."""
    cfg = ServeConfig(port=_free_port(), max_concurrency=1, queue=16, threads=1, api_key=KEY, header_timeout_s=1.0,
                      max_body_bytes=64 << 10)
    served = load_served(bundle, cfg, tmp_path_factory.mktemp("guarded"))
    with BackgroundServer(served, cfg) as url:
        yield url, served


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_auth_comes_before_parsing_and_bad_values_are_4xx_not_500(guarded):
    url, _ = guarded
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text  # the body of an unauthenticated request is never parsed
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "seed": -1, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/completions", content=b"x" * (65 << 10), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["error"]["message"], r.text


def test_a_huge_prompt_is_refused_before_tokenizing_and_health_stays_fast(bundle, tmp_path):
    """A prompt far beyond the context must not be tokenized at all (it once froze /health for 44 s at 4 MB)."""
    cfg = ServeConfig(port=_free_port(), threads=1)
    served = load_served(bundle, cfg, tmp_path)
    calls = []
    real = served.tokenizer.__class__.__call__

    class Counting(served.tokenizer.__class__):
        def __call__(self, text, *a, **kw):
            calls.append(len(text))
            return real(self, text, *a, **kw)

    served.tokenizer.__class__ = Counting
    prompt = "Once upon a time " * (3_500_000 // 17)  # ~3.5 MB: under the 4 MiB body limit
    with BackgroundServer(served, cfg) as url:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                big = asyncio.create_task(c.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}))
                lat = []
                for _ in range(10):  # /health while the big request is in flight
                    t0 = time.perf_counter()
                    assert (await c.get(url + "/health")).status_code == 200
                    lat.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.05)
                return await big, lat

        r, lat = asyncio.run(main())
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert max(lat) < 2.0, lat
    assert all(n < 1_000_000 for n in calls), calls  # never handed to the tokenizer


def test_slow_headers_are_cut_off(guarded):
    url, _ = guarded
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        socks.append(s)
    t0 = time.time()
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1024) == b""  # the server closed it
        except OSError:
            closed += 1
        finally:
            s.close()
    assert closed == 20 and time.time() - t0 < 8
    assert httpx.get(url + "/health").status_code == 200


def test_clients_that_leave_a_non_streamed_request_stop_its_generation(guarded):
    """Six non-streamed requests at a one-slot server, each client gone 0.1 s after sending: the queued ones never
    generate, and the running one stops."""
    url, served = guarded
    port = int(url.rsplit(":", 1)[1])
    before = _metric(url, "edgepack_completion_tokens_total", AUTH)
    cancelled = _metric(url, "edgepack_cancelled_total", AUTH)
    body = b'{"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": true}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    socks = []
    for _ in range(6):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head + body)
        socks.append(s)
    time.sleep(0.1)
    for s in socks:
        s.close()
    deadline = time.time() + 60
    while _metric(url, "edgepack_requests_running", AUTH) + _metric(url, "edgepack_requests_queued", AUTH) > 0 \
            and time.time() < deadline:
        time.sleep(0.1)
    assert _metric(url, "edgepack_cancelled_total", AUTH) - cancelled >= 4
    assert _metric(url, "edgepack_completion_tokens_total", AUTH) - before <= 2 * 64


class _FixedLogits:
    """A runtime whose logits never change: what the penalties do is then exactly computable."""

    def __init__(self, row):
        self.row = row

    def reset(self):
        pass

    def prefill(self, ids):
        import numpy as np

        return np.array([self.row], dtype=np.float32)

    def decode_step(self, ids):
        return self.prefill(ids)


@pytest.mark.parametrize("kw,expected", [
    ({}, [0, 0, 0, 0, 0]),
    ({"frequency_penalty": 1.0}, [0, 1, 0, 1, 0]),  # 3 - 1*c0 vs 2.5 - 1*c1
    ({"presence_penalty": 1.0}, [0, 1, 0, 0, 0]),  # once both appeared, both lose 1: token 0 leads again
    ({"logit_bias": ((2, 5.0),)}, [2, 2, 2, 2, 2]),
    ({"logit_bias": ((0, -100.0),)}, [1, 1, 1, 1, 1]),
    ({"frequency_penalty": -1.0, "logit_bias": ((1, 1.0),)}, [1, 1, 1, 1, 1]),
])
def test_penalties_and_logit_bias_follow_openai_definitions(kw, expected):
    res = generate(_FixedLogits([3.0, 2.5, 0.0, -1.0]), [[1]], GenerationConfig(max_new_tokens=5, **kw))
    assert res.tokens[0].tolist() == expected


def test_server_applies_penalties_and_logit_bias_and_refuses_tools(server):
    url, served, expected = server
    client = _client(url, max_retries=0)
    prompt = PROMPTS[0]
    greedy = _greedy(served, prompt)
    banned = client.completions.create(model=served.model_id, prompt=prompt, max_tokens=6, temperature=0,
                                       logit_bias={str(greedy[0]): -100})
    forced = client.completions.create(model=served.model_id, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"300": 100})
    assert served.tokenizer(banned.choices[0].text, add_special_tokens=False)["input_ids"][:1] != greedy[:1]
    assert served.tokenizer(forced.choices[0].text, add_special_tokens=False)["input_ids"] == [300] * 4
    # frequency / presence penalties: the server's text is what generate() gives with the same settings
    rt = served.pool.get()
    try:
        ids = generate(rt, served.tokenizer(prompt)["input_ids"],
                       GenerationConfig(max_new_tokens=64, stop_token_ids=served.eos, frequency_penalty=2.0,
                                        presence_penalty=1.0)).tokens[0].tolist()
        plain = generate(rt, served.tokenizer(prompt)["input_ids"],
                         GenerationConfig(max_new_tokens=64, stop_token_ids=served.eos)).tokens[0].tolist()
    finally:
        served.pool.put(rt)
    assert ids != plain
    pen = client.completions.create(model=served.model_id, prompt=prompt, max_tokens=64, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=1.0)
    assert pen.choices[0].text == served.tokenizer.decode([t for t in ids if t not in served.eos], skip_special_tokens=True)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(model=served.model_id, messages=[{"role": "user", "content": "hi"}],
                                       tools=[tool])
    for body, needle in [({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
                         ({"prompt": "hi", "logit_bias": {"1": 101}}, "logit_bias"),
                         ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty")]:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


class _Slow:
    """A runtime proxy whose decode steps take 50 ms: a generation that is still running when the server stops."""

    def __init__(self, rt):
        self.rt = rt

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def decode_step(self, ids):
        time.sleep(0.05)
        return self.rt.decode_step(ids)


def test_stopping_the_server_ends_generations_in_flight_at_once(bundle, tmp_path):
    """Ctrl-C with a request in flight (run_until_signal calls the app's stop_generations first): the generation
    stops at its next token and its response completes, instead of running to its end while the shutdown waits and
    then being cancelled mid-response (an ASGI traceback)."""
    import threading

    cfg = ServeConfig(port=_free_port(), max_concurrency=1, queue=1, threads=1, max_tokens_cap=64)
    served = load_served(bundle, cfg, tmp_path / "u")
    served.pool.put(_Slow(served.pool.get()))
    bg = BackgroundServer(served, cfg)
    with bg as url:
        out = {}

        def ask():
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 64, "temperature": 1.0,
                                                          "seed": 1}, timeout=60)
            out.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - t0)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.8)  # 64 steps x 50 ms = 3.2 s if nothing stops it
        t0 = time.perf_counter()
        bg.server.config.app.stop_generations()
        t.join(timeout=30)
        assert out["status"] == 200 and out["body"]["choices"][0]["finish_reason"] == "cancelled", out
        assert time.perf_counter() - t0 < 1.0 and out["seconds"] < 3.0, out["seconds"]
