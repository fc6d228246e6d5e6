"""The OpenAI-compatible HTTP API of `cscompile serve` (FastAPI on uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template),
GET /v1/models, GET /health. Requests go to runtime.engine.Engine, which decodes them together;
this module only validates, tokenizes, applies stop strings and shapes responses.

* Bad input never reaches the engine: malformed JSON, wrong types of known fields (numbers and
  booleans are strict: "16" is not an int), empty or over-long prompts, max_tokens beyond the
  context and unsupported options (n > 1, logprobs, echo, best_of, penalties, logit_bias,
  tools, non-text content) get a 4xx JSON error in OpenAI's shape,
  {"error": {"message", "type", "param", "code"}}. Unknown fields are ignored, as OpenAI does.
* Back-pressure: a full queue answers 429 (with Retry-After); no decode slot within the
  queue timeout 503; past the request timeout while decoding 504; a stopped engine 503.
* A stop string ends the request as soon as the decoded text contains it (the text up to it
  is returned, finish_reason "stop"); while streaming, the last len(longest stop) - 1
  characters are held back until they cannot start a stop string.
* A client that disconnects (streaming or not) cancels its request; the engine frees its slot
  before the next decode step.
* Every completion (and the last chunk of a stream) carries the extension field "cscompile":
  {"path", "class_id", "bytes_per_token", "density", "decode_steps", "batch_size",
   "finish_reason", "queue_ms", "prefill_ms", "decode_ms"} (README, `cscompile serve`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, \
    ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineStopped, QueueFull, Request

MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413) unread
CHARS_PER_TOKEN_LIMIT = 16  # prompts above context * this many characters are refused untokenized

Temperature = Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=0, lt=2 ** 63)]
MaxTokens = Annotated[int, Field(strict=True, ge=1)]
Stop = StrictStr | Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                             Field(max_length=4)] | None


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- request models
class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI does

    model: StrictStr | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0  # OpenAI's default: pass 0 for greedy
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: dict[str, StrictBool] | None = None
    n: StrictInt = 1
    # accepted only at their no-op values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: Any = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr]
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_Part] | None = None


class ChatRequest(_Common):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # the newer name of max_tokens
    tools: list | None = None


def _unsupported(p: _Common):
    """Options this server cannot honour are refused rather than silently ignored."""
    checks = [("n", p.n != 1, "n must be 1 (one choice per request)"),
              ("logprobs", p.logprobs not in (None, False, 0), "logprobs are not supported"),
              ("presence_penalty", p.presence_penalty != 0, "presence_penalty is not supported"),
              ("frequency_penalty", p.frequency_penalty != 0,
               "frequency_penalty is not supported"),
              ("logit_bias", bool(p.logit_bias), "logit_bias is not supported")]
    if isinstance(p, CompletionRequest):
        checks += [("echo", p.echo, "echo is not supported"),
                   ("best_of", p.best_of not in (None, 1), "best_of must be 1"),
                   ("suffix", bool(p.suffix), "suffix is not supported")]
    else:
        checks += [("tools", bool(p.tools), "tools are not supported")]
    for param, bad, message in checks:
        if bad:
            raise ApiError(400, message, param=param, code="unsupported")


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    # pydantic names the union member it tried ("stop.str"): keep the field path only
    loc = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or not (
        "[" in x or "-" in x or x in ("str", "int", "float", "bool", "list", "dict"))) or None
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ApiError(400, f"{loc}: {err['msg']}{more}" if loc else err["msg"], param=loc,
                    code="invalid_value")


async def _read_json(http: HttpRequest) -> dict:
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


# ----------------------------------------------------------------------------- text and stops
class _Text:
    """The completion's text as tokens arrive: decoded incrementally (a window of the last
    tokens, so long answers stay linear), cut at the first stop string, released in pieces
    that hold back what could still start one. `answer()` is the whole decode (what the
    runtime's Result.text is) unless a stop string cut it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self._prefix = self._read = 0  # decode window: ids[_prefix:] against ids[_prefix:_read]
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        """Add a token; returns the text that can be sent now."""
        self.ids.append(token)
        return self._release(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """All tokens are in: the rest of the text."""
        return "" if self.stopped else self._release(self._decode_new(final=True), final=True)

    def answer(self) -> str:
        return self.text if self.stopped else self.tok.decode(self.ids, skip_special_tokens=True)

    def _decode_new(self, final: bool) -> str:
        def dec(a, b=None):
            return self.tok.decode(self.ids[a:b], skip_special_tokens=True)

        before, now = dec(self._prefix, self._read), dec(self._prefix)
        # an incomplete multi-byte character decodes as U+FFFD: wait for the rest
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.text += new
        if self.stops:  # a stop string cannot start inside what was already released
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped, final = self.text[:min(hits)], True, True
        end = len(self.text) if final else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


# ----------------------------------------------------------------------------- the app
def create_app(session, engine, model_name: str, timeout_s: float | None = 300.0,
               queue_timeout_s: float | None = None) -> FastAPI:
    """The FastAPI app over a started-on-startup `engine` (runtime.engine.Engine); requests
    end after `timeout_s`, or after `queue_timeout_s` without a decode slot."""
    from contextlib import asynccontextmanager

    from .generate import encode

    # the engine thread decodes with session.tokenizer; this copy is the HTTP side's own
    tok = copy.deepcopy(session.tokenizer)
    ctx = session.context_length or 2048
    created = int(time.time())
    info = _model_info(session, engine, ctx)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="cscompile serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(Exception)
    async def _bug(request, e):  # never a bare 500 page: the OpenAI shape, the server lives on
        return ApiError(500, f"internal error ({type(e).__name__})", "server_error").response()

    @app.get("/health")
    async def health():
        stats = {"status": "ok" if engine.alive else "stopped", "model": model_name,
                 **engine.stats(), "uptime_s": round(time.time() - engine.started, 1)}
        return JSONResponse(stats, status_code=200 if engine.alive else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created,
                "owned_by": "cscompile", "cscompile": info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{model_name}`", "not_found_error", "model", "model_not_found")
        return model_card()

    def check_model(p: _Common):
        if p.model is not None and p.model != model_name:
            raise ApiError(404, f"The model `{p.model}` does not exist; this server serves "
                                f"`{model_name}`", "not_found_error", "model", "model_not_found")

    def check_chars(text: str, param: str):
        if len(text) > ctx * CHARS_PER_TOKEN_LIMIT:
            raise ApiError(400, f"{param} is {len(text)} characters; this model's context is "
                                f"{ctx} tokens", param=param, code="context_length_exceeded")

    def completion_ids(p: CompletionRequest) -> list[int]:
        prompt = p.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "this server takes one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        check_chars(prompt, "prompt")
        return encode(tok, prompt, chat=False)

    def chat_ids(p: ChatRequest) -> list[int]:
        messages = []
        for i, m in enumerate(p.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise ApiError(400, "only text content parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content})
        text = "".join(m["content"] for m in messages)
        if not text.strip():
            raise ApiError(400, "messages hold no text", param="messages")
        check_chars(text, "messages")
        if not getattr(tok, "chat_template", None):
            # no template: the contents as plain text (one user message is exactly what
            # `cscompile run --chat` encodes for such a tokenizer)
            return encode(tok, "\n".join(m["content"] for m in messages), chat=False)
        try:
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        except Exception as e:  # noqa: BLE001 - the template refused these messages
            raise ApiError(400, f"the chat template refused these messages ({e})",
                           param="messages") from None
        return list(tok(rendered, add_special_tokens=False)["input_ids"])

    def budget(ids: list[int], max_tokens: int | None, default: int | None) -> int:
        n = len(ids)
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the "
                                f"prompt has {n}, leaving no room to generate",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is not None and n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, "
                                f"you requested {n + max_tokens} tokens ({n} in the prompt, "
                                f"{max_tokens} for the completion). Please reduce the prompt "
                                f"or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens if max_tokens is not None else min(default or ctx, ctx - n)

    async def handle(http: HttpRequest, chat: bool):
        body = await _read_json(http)
        try:
            p = (ChatRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        check_model(p)
        _unsupported(p)
        ids = chat_ids(p) if chat else completion_ids(p)
        max_tokens = (p.max_completion_tokens or p.max_tokens) if chat else p.max_tokens
        # OpenAI's defaults: 16 tokens for completions, up to the context for chat
        n_new = budget(ids, max_tokens, None if chat else 16)
        stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        job = _Job(asyncio.get_running_loop())
        req = Request(ids, n_new, job.on_event, temperature=p.temperature, top_p=p.top_p,
                      seed=p.seed, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise ApiError(503, f"server unavailable: {e}", "service_unavailable",
                           code="shutting_down") from None
        shape = _Shape(chat, model_name, len(ids))
        text = _Text(tok, stops)
        if p.stream:
            usage = bool((p.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, req, text, shape, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(http, job, req, text, shape)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, chat=True)

    return app


def _model_info(session, engine, ctx: int) -> dict:
    """What /v1/models says about the bundle: its default path, bytes per token, classes."""
    info = {"source": session.source, "is_bundle": session.is_bundle, "path": engine.kind,
            "context_length": ctx, "classes": len(session.classes),
            "max_batch": engine.max_batch, "max_queue": engine.max_queue, "exact": engine.exact}
    if session.pertoken is not None:
        nb = session.pertoken.bytes()
        info["pertoken"] = {"bytes_per_token": int(round(nb["bytes"])),
                            "dense_bytes_per_token": int(round(nb["dense_bytes"])),
                            "fraction": round(nb["fraction"], 4)}
    return info


# ----------------------------------------------------------------------------- responses
class _Job:
    """Engine events (from its thread) delivered into this request's asyncio queue."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def on_event(self, *event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _Shape:
    """OpenAI response and chunk bodies for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def full(self, text: str, finish: str, n_tokens: int, ext: dict) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": finish} if self.chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**self._head(False), "choices": [choice], "usage": self.usage(n_tokens),
                "cscompile": ext}

    def chunk(self, piece: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None,
                      "finish_reason": finish}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, n_tokens: int) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(n_tokens)}


def _extension(result, queue_s: float, finish: str) -> dict:
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    b = mean(result.bytes_per_token)
    return {"path": result.path, "class_id": result.class_id,
            "bytes_per_token": int(round(b)) if b is not None else None,
            "density": round(mean(result.densities), 4) if result.densities else None,
            "decode_steps": len(result.densities), "batch_size": result.batch_size,
            "finish_reason": finish, "queue_ms": round(queue_s * 1e3, 1),
            "prefill_ms": round(result.prefill_s * 1e3, 1),
            "decode_ms": round(result.decode_s * 1e3, 1)}


def _error_of(event, got_tokens: bool) -> ApiError:
    _, kind, message = event
    if kind == "timeout":
        return ApiError(504, f"timeout: {message}", "timeout", code="timeout") if got_tokens \
            else ApiError(503, f"server overloaded: {message}", "service_unavailable",
                          code="overloaded", headers={"Retry-After": "1"})
    if kind == "shutdown":
        return ApiError(503, message, "service_unavailable", code="shutting_down")
    if kind == "cancelled":  # only the client cancels: nobody reads this
        return ApiError(499, message, "cancelled")
    return ApiError(500, message, "server_error")


async def _events(job: _Job, req: Request, text: _Text):
    """(kind, payload) until the request ends: ("piece", str) while decoding, then
    ("done", (finish, n_tokens, ext)) or ("error", ApiError)."""
    n_tokens = 0
    while True:
        event = await job.queue.get()
        if event[0] == "token":
            if text.stopped:
                continue  # decoded before the cancel took effect: not part of the answer
            n_tokens += 1
            piece = text.push(event[1])
            if text.stopped:
                req.cancel()  # the engine frees the slot; its "done" ends this loop
            if piece:
                yield "piece", piece
        elif event[0] == "done":
            result, queue_s = event[1], event[2]
            piece = text.finish()
            if piece:
                yield "piece", piece
            finish = "stop" if text.stopped or result.finish_reason == "eos" else "length"
            yield "done", (finish, n_tokens, _extension(result, queue_s, finish))
            return
        else:
            yield "error", _error_of(event, n_tokens > 0)
            return


async def _collect(http: HttpRequest, job: _Job, req: Request, text: _Text, shape: _Shape):
    async def watch():  # a client that hangs up cancels its request (and frees its slot)
        while not await http.is_disconnected():
            await asyncio.sleep(1.0)
        req.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for kind, payload in _events(job, req, text):
            if kind == "error":
                return payload.response()
            if kind == "done":
                finish, n_tokens, ext = payload
                return JSONResponse(shape.full(text.answer(), finish, n_tokens, ext))
    finally:
        watcher.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: _Job, req: Request, text: _Text, shape: _Shape, include_usage: bool):
    try:
        if shape.chat:
            yield _sse(shape.chunk(None, role=True))
        async for kind, payload in _events(job, req, text):
            if kind == "piece":
                yield _sse(shape.chunk(payload))
            elif kind == "error":
                yield _sse(payload.body())
                break
            else:
                finish, n_tokens, ext = payload
                yield _sse({**shape.chunk(None, finish), "cscompile": ext})
                if include_usage:
                    yield _sse(shape.usage_chunk(n_tokens))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the response task is cancelled) or we are done
        req.cancel()
