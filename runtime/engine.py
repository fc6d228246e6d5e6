"""Continuous batching for `cscompile serve`: one thread owns the session and decodes every
admitted request together, one forward per step per path, on runtime.generate.DecodeBatch.

    engine = Engine(session, max_batch=8, max_queue=64)
    engine.start()
    engine.submit(Request(ids, max_new_tokens=16, on_event=callback))  # QueueFull when full
    ...
    engine.stop()

Between two decode steps the loop (1) takes out the rows whose request was cancelled (the
client went away, a stop string matched) or ran past its deadline, (2) admits queued requests
while fewer than `max_batch` rows decode: each is prefilled alone and routed exactly as
`generate` does, then joins the open DecodeBatch of its path (the per-token path and dense
share one batch each; static class paths one per class), and (3) steps every open batch once.
So a request's tokens are those it gets alone (greedy) up to float reordering, whatever else
decodes beside it. The per-token path selects channels and vocabulary rows by top-k, so a
reordering that moves a score across a selection boundary can change a later token (SmolLM2:
results/serve_load_smollm2.md); `exact=True` gives every row a batch of its own (one batch-1
forward per row and step, as `generate` runs), which is bit-for-bit the solo output at the cost
of batching. The prefill and decode code is the runtime's own: nothing is re-implemented here.

Callbacks (`Request.on_event`) run on the engine thread and must not block:
    ("token", token_id)            every generated token, the first one from the prefill
    ("done", Result, queue_s)       finished: Result.finish_reason is eos | length | context,
                                   or "cancelled" (cancel() while decoding: what it got so far)
    ("error", kind, message)        kind "timeout" | "cancelled" (while queued) | "shutdown" |
                                   "internal"
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class QueueFull(Exception):
    """The bounded queue holds `max_queue` requests already: retry later."""


class EngineStopped(Exception):
    """The engine is not running (shutting down, or never started)."""


@dataclass(eq=False)
class Request:
    ids: list[int]  # the prompt's token ids (checked against the context by the caller)
    max_new_tokens: int
    on_event: Callable
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    timeout_s: float | None = None  # from submission to the last token
    queue_timeout_s: float | None = None  # from submission to a decode slot
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    cancelled: bool = False  # set from any thread; the row leaves before the next step

    def cancel(self):
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.submitted > self.timeout_s

    def waited_too_long(self, now: float) -> bool:
        limit = min(t for t in (self.timeout_s, self.queue_timeout_s, float("inf"))
                    if t is not None)
        return now - self.submitted > limit


class Engine:
    """See the module docstring. `path`: the decode path of every request (None: the
    session's default, the per-token path for a bundle that has one); `exact`: decode every
    row in a batch of its own (outputs bit-for-bit those of `generate`)."""

    def __init__(self, session, path: str | None = None, max_batch: int = 8,
                 max_queue: int = 64, exact: bool = False):
        from .generate import path_kind

        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.session, self.kind = session, path_kind(session, path)
        self.max_batch, self.max_queue, self.exact = max_batch, max_queue, exact
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._batches: dict = {}  # path key -> DecodeBatch
        self._owner: dict = {}  # BatchRow -> Request
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counts = collections.Counter()  # completed, cancelled, timeout, internal, steps
        self.started = time.time()

    # ------------------------------------------------------------------ caller side
    def start(self):
        self._thread = threading.Thread(target=self._run, name="cscompile-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, req: Request):
        with self._cv:
            if not self.alive:
                raise EngineStopped("the decode engine is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting for a decode "
                                f"slot (queue limit {self.max_queue}, {self.max_batch} decoding)")
            self._queue.append(req)
            self._cv.notify()

    def stop(self, timeout: float = 30.0):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cv:
            queued = len(self._queue)
        return {"queued": queued, "decoding": len(self._owner), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "path": self.kind, "exact": self.exact,
                **dict(self.counts)}

    # ------------------------------------------------------------------ engine thread
    def _run(self):
        with torch.no_grad():  # grad mode is per thread
            try:
                while not self._stopping:
                    self._reap()
                    self._admit()
                    if not self._owner:
                        with self._cv:
                            if not self._queue and not self._stopping:
                                self._cv.wait(0.25)  # wakes on submit; polls cancellations
                        continue
                    for key in list(self._batches):
                        self._step(key)
            finally:
                self._shutdown()

    def _emit(self, req: Request, *event):
        try:
            req.on_event(*event)
        except Exception:  # a callback must never take the engine down (e.g. loop closed)
            req.cancel()

    def _fail(self, req: Request, kind: str, message: str):
        self.counts[kind] += 1
        self._emit(req, "error", kind, message)

    def _reap(self):
        """Cancelled and timed-out requests leave the queue and their batch."""
        now = time.monotonic()
        with self._cv:
            waiting = list(self._queue)
            self._queue = collections.deque(r for r in waiting
                                            if not (r.cancelled or r.waited_too_long(now)))
        for r in waiting:
            if r.cancelled:
                self._fail(r, "cancelled", "cancelled while queued")
            elif r.waited_too_long(now):
                self._fail(r, "timeout", f"no decode slot within {now - r.submitted:.1f} s "
                                         f"({self.max_batch} requests were decoding)")
        for row, req in list(self._owner.items()):
            if req.cancelled:
                row.finish = "cancelled"
                self.counts["cancelled"] += 1
                self._emit(req, "done", row.result(self._leave(row)),
                           req.admitted - req.submitted)
            elif req.expired(now):
                self._leave(row)
                self._fail(req, "timeout", f"request ran past its {req.timeout_s:g} s "
                                           f"timeout after {len(row.generated)} tokens")

    def _leave(self, row):
        """Take a decoding row out of its batch; returns the batch's path."""
        self._owner.pop(row, None)
        for key, batch in list(self._batches.items()):
            if row in batch.rows:
                batch.drop(row)
                if not batch.rows:
                    batch.close()
                    del self._batches[key]
                return batch.path
        raise AssertionError("a decoding row belongs to a batch")

    def _admit(self):
        from .generate import _batchable, _options, _Path, _prefill, DecodeBatch

        s = self.session
        while len(self._owner) < self.max_batch:
            with self._cv:
                if not self._queue:
                    return
                req = self._queue.popleft()
            req.admitted = time.monotonic()
            try:
                opts = _options(s, req.max_new_tokens, req.temperature, req.top_p, req.seed,
                                None)
                pre = _prefill(s, req.ids, opts)
                path = _Path(s, pre.class_id, self.kind, None)
                key = ("class", pre.class_id) if path.use_class else (self.kind,)
                if self.exact or not _batchable(pre.cache):  # (sliding-window layers)
                    key = ("alone", id(req))
                batch = self._batches.get(key)
                if batch is None:
                    batch = self._batches[key] = DecodeBatch(s, path)
                row = batch.add(pre, opts)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                self._fail(req, "internal", f"prefill failed ({type(e).__name__}: {e})")
                continue
            self._emit(req, "token", row.generated[-1])
            if row.finish is not None:  # ended on its first token: never entered the cache
                self._finish(req, row, batch.path)
                if not batch.rows:
                    batch.close()
                    self._batches.pop(key, None)
            else:
                self._owner[row] = req

    def _step(self, key):
        batch = self._batches[key]
        try:
            done = batch.step()
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving
            for row in list(batch.rows):
                req = self._owner.pop(row)
                self._fail(req, "internal", f"decode step failed ({type(e).__name__}: {e})")
            batch.close()
            del self._batches[key]
            return
        self.counts["steps"] += 1
        for row in batch.rows + done:
            self._emit(self._owner[row], "token", row.generated[-1])
        for row in done:
            self._finish(self._owner.pop(row), row, batch.path)
        if not batch.rows:
            batch.close()
            del self._batches[key]

    def _finish(self, req: Request, row, path):
        self.counts["completed"] += 1
        self._emit(req, "done", row.result(path), req.admitted - req.submitted)

    def _shutdown(self):
        with self._cv:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
        for req in waiting + list(self._owner.values()):
            self._fail(req, "shutdown", "the server is shutting down")
        self._owner.clear()
        for batch in self._batches.values():
            batch.close()
        self._batches.clear()
