"""`cscompile serve` on loopback with the real `openai` client, on a stories260K bundle: greedy
text equals `cscompile run`; chat; streaming; stop strings; concurrent requests each equal their
solo output (rows joining and leaving the batch); bad input is a 4xx in OpenAI's error shape
and leaves the server healthy; back-pressure (429), client disconnects, timeouts."""
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from cscompile.build import run_build  # noqa: E402
from cscompile.runtime import generate as gen_mod  # noqa: E402
from cscompile.runtime import load  # noqa: E402
from cscompile.runtime.cli_run import run  # noqa: E402
from cscompile.runtime.engine import Engine  # noqa: E402
from cscompile.runtime.openai_api import _Text, create_app  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
PROMPTS = ["Once upon a time, a little fox", "Tom has 12 apples and buys 7 more.", "The dog",
           "Lily went to the park and saw a big red ball", "One day", "Sam and his mom"]
N = 24
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bundle(stories_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    calib = tmp / "calib.jsonl"  # a third of the examples: the build stays a few seconds
    calib.write_text("".join(EXAMPLES.read_text().splitlines(keepends=True)[:8]))
    out = tmp / "bundle"
    run_build(str(stories_dir), calib, out, progress=False, budget=0.6)
    return out


class Server:
    """uvicorn on 127.0.0.1, an ephemeral port, in a thread of this process."""

    def __init__(self, session=None, name="stories", timeout_s=60.0, queue_timeout_s=None,
                 app=None, **engine_kw):
        self.engine = None
        if app is None:
            self.engine = Engine(session, **engine_kw)
            app = create_app(session, self.engine, name, timeout_s=timeout_s,
                             queue_timeout_s=queue_timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                                    api_key="none", max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or
                         ({"Content-Type": "application/json"} if body is not None else {}))
            resp = conn.getresponse()
            data = resp.read().decode()
            try:
                data = json.loads(data)
            except json.JSONDecodeError:
                pass
            return resp.status, dict(resp.getheaders()), data
        finally:
            conn.close()

    def post(self, path, obj):
        return self.raw("POST", path, json.dumps(obj).encode())

    def health(self):
        return self.raw("GET", "/health")[2]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive() and not (self.engine and self.engine.alive)


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(load(bundle), max_batch=4, max_queue=16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mask_server(bundle):
    """The torch backend: a batched step keeps each row's own support (on the CPU kernels a
    step of several rows reads every weight, PerToken.step_mode)."""
    s = Server(load(bundle, backend="torch"), max_batch=4, max_queue=16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref(bundle):
    """A second session on the same bundle: solo references, never touched by the server."""
    return load(bundle)


@pytest.fixture(scope="module")
def cli_solo(bundle, tmp_path_factory):
    """`cscompile run --input` (one prompt at a time) on PROMPTS, plain and --chat."""
    tmp = tmp_path_factory.mktemp("solo")
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = {}
    for chat in (False, True):
        res = CliRunner().invoke(run, [str(bundle), "--input", str(inp), "--output",
                                       str(tmp / f"out{chat}.jsonl"), "--max-new-tokens", str(N)]
                                 + (["--chat"] if chat else []))
        assert res.exit_code == 0, res.output
        out[chat] = [json.loads(line) for line in (tmp / f"out{chat}.jsonl").read_text()
                     .splitlines()]
    return out


@pytest.fixture(scope="module")
def dense_session(stories_dir):
    return load(stories_dir)


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes at least 20 ms more (deterministic queueing and timeouts)."""
    step = gen_mod.DecodeBatch.step

    def slow(self):
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(gen_mod.DecodeBatch, "step", slow)


# ----------------------------------------------------------------------------- equality
def test_completion_equals_cscompile_run(server, cli_solo, bundle):
    res = CliRunner().invoke(run, [str(bundle), "--prompt", PROMPTS[0],
                                   "--max-new-tokens", str(N)])
    assert res.exit_code == 0, res.output
    r = server.client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=N,
                                         temperature=0)
    assert r.choices[0].text == res.stdout.rstrip("\n") == cli_solo[False][0]["text"]
    want = cli_solo[False][0]
    assert r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.usage.completion_tokens == len(want["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("stop" if want["finish_reason"] == "eos" else "length")
    ext = r.model_extra["cscompile"]
    assert ext["path"] == "pertoken" and ext["decode_steps"] == len(want["densities"])
    assert ext["bytes_per_token"] == round(sum(want["bytes_per_token"])
                                           / len(want["bytes_per_token"]))
    assert 0 < ext["density"] < 1 and ext["class_id"] == want["class_id"]


def test_chat_equals_cscompile_run_chat(server, cli_solo):
    for i in (1, 3):
        r = server.client.chat.completions.create(
            model="stories", messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=N,
            temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == cli_solo[True][i]["text"]
        assert r.usage.prompt_tokens == cli_solo[True][i]["prompt_tokens"]


def test_streaming_matches_non_streaming(server, cli_solo):
    chunks = list(server.client.completions.create(
        model="stories", prompt=PROMPTS[2], max_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert len(chunks) > 3  # text arrives in pieces, not once at the end
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == cli_solo[False][2]["text"]
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["cscompile"]["path"] == "pertoken"
    assert chunks[-1].usage.completion_tokens == len(cli_solo[False][2]["token_ids"])
    chat = list(server.client.chat.completions.create(
        model="stories", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=N,
        temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == cli_solo[True][1]["text"]
    assert chat[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(server, cli_solo):
    full = cli_solo[False][0]["text"]
    word = full.split()[3]
    want = full[:full.index(word)]
    r = server.client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=N,
                                         temperature=0, stop=[word, "zzzz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(cli_solo[False][0]["token_ids"])
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="stories", prompt=PROMPTS[0], max_tokens=N, temperature=0, stop=word,
        stream=True))
    assert streamed == want


def test_text_holds_back_a_partial_stop_string(ref):
    tok = ref.tokenizer
    ids = tok("Once upon a time there was a big dog", add_special_tokens=False)["input_ids"]
    t = _Text(tok, ["a big cat", "a big dog"])
    pieces = [t.push(i) for i in ids]
    released = "".join(pieces)
    assert t.stopped and "a big" not in released and released + t.finish() == t.answer()
    assert t.answer() == "Once upon a time there was "
    plain = _Text(tok, [])
    assert "".join(plain.push(i) for i in ids) + plain.finish() == tok.decode(ids)


def test_concurrent_requests_each_equal_their_solo_output(mask_server, bundle):
    """More requests than slots, with different lengths: rows join as others leave."""
    server, ref = mask_server, load(bundle, backend="torch")
    lengths = [N, 6, N, 10, 16, 3]
    want = [ref.generate(p, max_new_tokens=m).text for p, m in zip(PROMPTS, lengths)]
    sampled = ref.generate(PROMPTS[4], max_new_tokens=12, temperature=0.9, seed=11).text

    def one(i):
        r = server.client.completions.create(model="stories", prompt=PROMPTS[i],
                                             max_tokens=lengths[i], temperature=0)
        return r.choices[0].text, r.model_extra["cscompile"]["batch_size"]

    def sample():
        return server.client.completions.create(model="stories", prompt=PROMPTS[4],
                                                max_tokens=12, temperature=0.9,
                                                seed=11).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(len(PROMPTS))] + [pool.submit(sample)]
        got = [f.result() for f in futures]
    assert [g[0] for g in got[:-1]] == want
    assert got[-1] == sampled  # seeded sampling: each row has its own generator
    assert max(g[1] for g in got[:-1]) > 1  # they really decoded together
    assert server.health()["decoding"] == 0


def test_a_request_joining_mid_decode_equals_its_solo_output(mask_server, bundle):
    server, ref = mask_server, load(bundle, backend="torch")
    want_a = ref.generate(PROMPTS[0], max_new_tokens=40).text
    want_b = ref.generate(PROMPTS[3], max_new_tokens=8).text
    stream = server.client.completions.create(model="stories", prompt=PROMPTS[0],
                                              max_tokens=40, temperature=0, stream=True)
    parts, b = [], None
    for chunk in stream:
        parts.append(chunk.choices[0].text)
        if b is None and len(parts) == 4:  # A is decoding: B joins its batch
            b = server.client.completions.create(model="stories", prompt=PROMPTS[3],
                                                 max_tokens=8, temperature=0)
    assert "".join(parts) == want_a
    assert b.choices[0].text == want_b and b.model_extra["cscompile"]["batch_size"] == 2


def test_exact_mode_decodes_each_row_alone(bundle, ref):
    """--exact: concurrent requests still interleave step by step, each a batch-1 forward."""
    s = Server(load(bundle), max_batch=4, exact=True)
    try:
        want = [ref.generate(p, max_new_tokens=12).text for p in PROMPTS[:4]]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model="stories", prompt=p, max_tokens=12, temperature=0), PROMPTS[:4]))
        assert [r.choices[0].text for r in got] == want
        assert {r.model_extra["cscompile"]["batch_size"] for r in got} == {1}
        assert s.health()["exact"] is True
    finally:
        s.stop()


# ----------------------------------------------------------------------------- bad input
BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"prompt": "Once upon a time " * 200}, 400, "prompt"),
    ({"prompt": "x" * 100_000}, 400, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
]


def test_bad_input_is_a_4xx_in_openai_shape_and_the_server_lives(server):
    for body, status, param in BAD:
        route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
            else "/v1/completions"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, _, data = server.raw("POST", route, raw)
        assert got == status, (body, data)
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert param in (err["param"] or "") or param == err["code"], (body, err)
    # unknown fields of any type are ignored, as OpenAI does
    got, _, data = server.post("/v1/completions", {"prompt": "The cat", "max_tokens": 3,
                                                   "temperature": 0, "user": {"x": [1]},
                                                   "weird": None})
    assert got == 200 and data["usage"]["completion_tokens"] == 3
    assert server.raw("GET", "/nope")[0] == 404 and "error" in server.raw("GET", "/nope")[2]
    assert server.raw("GET", "/v1/completions")[0] == 405
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert server.raw("POST", "/v1/completions", big)[0] == 413
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="stories", prompt="x", max_tokens=100_000)
    assert "maximum context length is 512 tokens" in str(e.value)
    assert server.health()["status"] == "ok"
    r = server.client.completions.create(model="stories", prompt=PROMPTS[2], max_tokens=4,
                                         temperature=0)
    assert r.usage.completion_tokens == 4


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["stories"]
    info = models.data[0].model_extra["cscompile"]
    assert info["path"] == "pertoken" and 0 < info["pertoken"]["fraction"] < 1
    assert info["context_length"] == 512
    h = server.health()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["queued"] == 0


# ----------------------------------------------------------------------------- back-pressure
def _open_stream(port, body):
    """A streaming request on a raw socket, read up to its first data chunk."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    return sock


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_full_queue_429_and_a_disconnect_frees_the_slot(dense_session, slow_steps):
    s = Server(dense_session, max_batch=1, max_queue=1)
    try:
        a = _open_stream(s.port, {"prompt": "Once upon a time", "max_tokens": 400,
                                  "stream": True})
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(s.post, "/v1/completions", {"prompt": "The dog", "max_tokens": 4,
                                                        "temperature": 0})
            _wait(lambda: s.health()["queued"] == 1, "B never queued")
            status, headers, data = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert status == 429 and headers.get("retry-after") == "1"
            assert data["error"]["type"] == "rate_limit_error" and "retry" in \
                data["error"]["message"]
            a.close()  # the client of A hangs up mid-stream: its slot goes to B
            status, _, data = b.result(timeout=60)
        assert status == 200 and data["usage"]["completion_tokens"] == 4
        _wait(lambda: s.health()["decoding"] == 0, "slot not freed")
        assert s.health()["cancelled"] >= 1 and s.engine.counts["steps"] < 300
    finally:
        s.stop()


def test_timeouts_503_queued_504_decoding(dense_session, slow_steps):
    s = Server(dense_session, max_batch=1, max_queue=4, timeout_s=1.5, queue_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(s.post, "/v1/completions", {"prompt": "Once", "max_tokens": 300})
            _wait(lambda: s.health()["decoding"] == 1, "A never decoded")
            b = pool.submit(s.post, "/v1/completions", {"prompt": "The", "max_tokens": 3})
            (sa, _, da), (sb, hb, db) = a.result(timeout=60), b.result(timeout=60)
        assert time.monotonic() - t0 < 20
        assert sa == 504 and da["error"]["type"] == "timeout"
        assert sb == 503 and "decode slot" in db["error"]["message"]
        assert s.health()["status"] == "ok"
    finally:
        s.stop()


def test_cli_serve_wires_session_engine_and_uvicorn(stories_dir, monkeypatch):
    """`cscompile serve MODEL --port P ...` hands uvicorn an app that serves MODEL (dense)."""
    from cscompile.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    res = CliRunner().invoke(main, ["serve", str(stories_dir), "--port", "8123", "--model-name",
                                    "tiny", "--max-batch", "2", "--path", "dense"])
    assert res.exit_code == 0, res.output
    assert "serving tiny (dense path" in res.stderr
    (app, kw), = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    s = Server(app=app)  # what uvicorn.run would have served
    try:
        r = s.client.completions.create(model="tiny", prompt="The dog", max_tokens=5,
                                        temperature=0)
        assert r.usage.completion_tokens == 5 and r.model_extra["cscompile"]["path"] == "dense"
        assert s.health()["max_batch"] == 2
    finally:
        s.stop()
    res = CliRunner().invoke(main, ["serve", str(stories_dir), "--path", "pertoken"])
    assert res.exit_code == 2 and "no per-token plan" in res.stderr
