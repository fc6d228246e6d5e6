"""Load test of `cscompile serve` on loopback: throughput, latency and memory vs concurrency,
dense vs the bundle's default path, then a fault run; writes results/serve_load_<name>.{md,json}.

    python benchmarks/serve_load.py BUNDLE          # dense and default path, ~9 min on 2 cores
    # then the default path under --exact, appended to the same results:
    python benchmarks/serve_load.py BUNDLE --paths default:exact --levels 1:8,4:32,16:64 --fault-requests 0 --add-to

For each path (`--paths`, "default" = the bundle's own default path) this script starts
`cscompile serve BUNDLE --path P` as a subprocess (the server process), warms it up, and then,
from this process, sends each level's requests (`--levels C:N` = N requests with C in flight at
once) as streaming /v1/completions, greedy, `--max-tokens` each, prompts cycled from
`--prompts` (default: the 80 MT-bench first turns in ../shared/data/mtbench). Per request it
records the time to the first token and to the end of the stream; a request fails unless it
answers 200, streams at least one token and ends with [DONE]. The server's RSS is sampled every
0.5 s (psutil). Every level's greedy texts are compared with the first level's (concurrency 1:
each request decoded alone) for the prompts both sent.

The fault run (on the last path's server): `--fault-requests` requests, 16 in flight, a third
ordinary, a third that disconnect after their first streamed chunk, a third malformed (bad JSON,
wrong types, empty or over-long prompts, max_tokens beyond the context, an unknown model). It
passes when every ordinary request succeeds, every malformed one gets a 4xx in OpenAI's error
shape, no response is a 5xx, and afterwards /health is ok with nothing decoding or queued and a
control prompt's greedy text is unchanged.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MTBENCH = REPO.parent / "shared" / "data" / "mtbench" / "data.jsonl"
HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- the server
class Served:
    """`cscompile serve` in a subprocess, with an RSS sampler."""

    def __init__(self, bundle: str, path: str | None, args, exact: bool = False):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "cscompile.cli", "serve", bundle, "--port", str(self.port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
               "--log-level", "warning", "--model-name", "m"] + (["--path", path] if path else []) \
            + (["--exact"] if exact else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
        self.log = open(Path(tempfile.gettempdir()) / f"serve_load_{args.name}_"
                        f"{path or 'default'}{'_exact' if exact else ''}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                status, health = get(self.port, "/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 600:
                raise SystemExit("server did not come up in 600 s")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        self.path = health["path"]
        self.ps = psutil.Process(self.proc.pid)
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop.is_set():
            try:
                self.rss.append((time.monotonic(), self.ps.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(0.5)

    def rss_now(self) -> int:
        return self.ps.memory_info().rss

    def close(self):
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def get(port, path):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def post(port, path, body: bytes, timeout=600):
    """(status, parsed body or None) of a non-streaming request."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, None
    finally:
        conn.close()


def stream(port, prompt: str, max_tokens: int, disconnect_after: int | None = None) -> dict:
    """One streaming completion; the record of what happened and when."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    t0 = time.perf_counter()
    rec = {"ok": False, "ttft_s": None, "latency_s": None, "text": "", "tokens": None,
           "status": None, "error": None}
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        rec["status"] = r.status
        if r.status != 200:
            rec["error"] = r.read().decode(errors="replace")[:300]
            return rec
        chunks, done = 0, False
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                rec["error"] = obj["error"]["message"]
                break
            piece, finish = obj["choices"][0]["text"], obj["choices"][0]["finish_reason"]
            if (piece or finish) and rec["ttft_s"] is None:  # an answer may be empty (eos)
                rec["ttft_s"] = time.perf_counter() - t0
            rec["text"] += piece
            if "cscompile" in obj:
                rec["ext"] = obj["cscompile"]
                rec["tokens"] = obj["cscompile"]["decode_steps"] + 1
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                rec["ok"] = True  # the client hangs up on purpose
                return rec
        rec["latency_s"] = time.perf_counter() - t0
        rec["ok"] = done and "ext" in rec and rec["error"] is None
        return rec
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    finally:
        conn.close()


# ----------------------------------------------------------------------------- load levels
def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def run_level(served: Served, prompts, concurrency: int, n: int, max_tokens: int) -> dict:
    rss0 = served.rss_now()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        recs = list(pool.map(lambda i: (i % len(prompts), stream(served.port, prompts[
            i % len(prompts)], max_tokens)), range(n)))
    wall = time.perf_counter() - t0
    ok = [r for _, r in recs if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok]
    tokens = sum(r["tokens"] or 0 for r in ok)
    batch = [r["ext"]["batch_size"] for r in ok if "ext" in r]
    return {"concurrency": concurrency, "requests": n, "ok": len(ok), "failed": n - len(ok),
            "failures": [r["error"] or r["status"] for _, r in recs if not r["ok"]][:5],
            "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 3),
            "completion_tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(pct(lat, 50), 3) if lat else None,
            "latency_p99_s": round(pct(lat, 99), 3) if lat else None,
            "ttft_p50_s": round(pct(ttft, 50), 3) if ttft else None,
            "ttft_p99_s": round(pct(ttft, 99), 3) if ttft else None,
            "mean_batch_size": round(statistics.mean(batch), 2) if batch else None,
            "rss_start_mb": round(rss0 / 2**20, 1),
            "rss_end_mb": round(served.rss_now() / 2**20, 1),
            "texts": [[i, r["text"]] for i, r in recs if r["ok"]]}


# ----------------------------------------------------------------------------- faults
MALFORMED = [
    b"{not json", b"[1, 2]", json.dumps({"prompt": ""}).encode(),
    json.dumps({"prompt": "x", "max_tokens": "16"}).encode(),
    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "hello " * 9000}).encode(),  # over the context
    json.dumps({"prompt": "x", "max_tokens": 10 ** 7}).encode(),
    json.dumps({"prompt": "x", "model": "not-this-one"}).encode(),
    json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(),
]


def fault_run(served: Served, prompts, n: int, max_tokens: int) -> dict:
    control = prompts[0]
    before = stream(served.port, control, max_tokens)

    def one(i):
        kind = ("ok", "disconnect", "malformed")[i % 3]
        if kind == "malformed":
            body = MALFORMED[(i // 3) % len(MALFORMED)]
            route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            status, data = post(served.port, route, body)
            shaped = isinstance(data, dict) and isinstance(data.get("error"), dict) and \
                {"message", "type", "param", "code"} <= set(data["error"])
            return kind, {"ok": 400 <= status < 500 and shaped, "status": status}
        rec = stream(served.port, prompts[i % len(prompts)], max_tokens if kind == "ok" else
                     4 * max_tokens, disconnect_after=1 if kind == "disconnect" else None)
        return kind, rec

    rss0 = served.rss_now()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        recs = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    deadline = time.monotonic() + 60  # cancelled rows leave before the next decode step
    while True:
        status, health = get(served.port, "/health")
        if health.get("decoding") == 0 and health.get("queued") == 0 or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    after = stream(served.port, control, max_tokens)
    by = {k: [r for kk, r in recs if kk == k] for k in ("ok", "disconnect", "malformed")}
    five = sum(1 for _, r in recs if (r.get("status") or 0) >= 500)
    result = {"requests": n, "wall_s": round(wall, 2),
              **{f"{k}_requests": len(v) for k, v in by.items()},
              **{f"{k}_passed": sum(1 for r in v if r["ok"]) for k, v in by.items()},
              "responses_5xx": five, "health_after": health, "health_status_after": status,
              "control_text_unchanged": before["ok"] and after["ok"] and
              before["text"] == after["text"],
              "rss_start_mb": round(rss0 / 2**20, 1),
              "rss_end_mb": round(served.rss_now() / 2**20, 1)}
    result["passed"] = (result["ok_passed"] == len(by["ok"]) and
                        result["malformed_passed"] == len(by["malformed"]) and five == 0 and
                        status == 200 and health.get("decoding") == 0 and
                        health.get("queued") == 0 and result["control_text_unchanged"])
    return result


# ----------------------------------------------------------------------------- report
def code_state() -> str:
    """The commit measured, and whether runtime/ had uncommitted edits (a shared checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "runtime", "cscompile"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted runtime/cscompile edits' if dirty else ''}"
    except OSError:
        return "unknown"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# `cscompile serve` under load: {report['name']}", "",
             f"{report['date']}, {report['machine']}. Bundle `{a['bundle']}` "
             f"({report['bundle_info']}).", "",
             "## Protocol", "",
             "; ".join(f"`{c['command']}` ({c['total_s']:.0f} s, {c.get('started', '?')}, code "
                       f"{c.get('code', '?')})" for c in report["commands"])
             + f". Server: `cscompile serve BUNDLE --path P [--exact] --max-batch "
             f"{a['max_batch']} --max-queue {a['max_queue']}` in its own process with "
             f"OMP_NUM_THREADS={a['server_threads']}; the clients run in this (second) process, "
             f"one thread per request in flight, over loopback HTTP/1.1. Each level sends N "
             f"streaming `/v1/completions` requests with C in flight at once, greedy, "
             f"max_tokens {a['max_tokens']}, prompts cycled from {report['prompt_source']}, "
             f"each cut to its first {a['prompt_words']} words (median "
             f"{report['prompt_tokens_median']} prompt tokens). Latency = request sent to "
             f"`[DONE]`; TTFT = to the first chunk with text (or the finish, for an empty "
             f"answer); failed = not 200, no final chunk, or no `[DONE]`. Each admitted request "
             f"is prefilled alone between two decode steps (no chunked prefill), so at high "
             f"concurrency prefills of arriving requests stall the running batch. RSS: the "
             f"server process, sampled every 0.5 s. Tokens/s counts "
             f"completion tokens. The machine's 2 cores are shared with other jobs, so absolute "
             f"figures are noisy; paths were measured one after the other.", "",
             "## Throughput and latency vs concurrency", "",
             "| path | C | requests | failed | req/s | tok/s | p50 latency s | p99 latency s | "
             "p50 TTFT s | mean batch | RSS start→end MB | = solo text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        name = run["path"] + (" --exact" if run.get("exact") else "")
        for lv in run["levels"]:
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['failed']} | "
                f"{lv['requests_per_s']:.2f} | {lv['completion_tokens_per_s']:.1f} | "
                f"{lv['latency_p50_s']} | {lv['latency_p99_s']} | {lv['ttft_p50_s']} | "
                f"{lv['mean_batch_size']} | {lv['rss_start_mb']:.0f}→{lv['rss_end_mb']:.0f} | "
                f"{lv['same_as_solo']} |")
    lines += ["", "\"= solo text\": of the requests whose prompt was also sent at concurrency "
              "1 (decoded alone, as `cscompile run` decodes), how many streamed the identical "
              "greedy text.", "",
              "## Memory", "",
              "RSS of the server process; \"max\" includes the two warm-up requests, \"after "
              "warm-up\" is sampled after them.", ""]
    for run in report["runs"]:
        m = run["rss_mb"]
        name = run["path"] + (" --exact" if run.get("exact") else "")
        lines.append(f"* {name}: server RSS after warm-up {m['after_warmup']:.0f} MB, "
                     f"max {m['max']:.0f} MB, at the end {m['end']:.0f} MB "
                     f"(startup {run['startup_s']:.0f} s).")
    f = report.get("fault")
    if f:
        h = f["health_after"]
        lines += ["", "## Fault run", "",
                  f"{f['requests']} requests on the {f['path']} server, 16 in flight: "
                  f"{f['ok_requests']} ordinary ({f['ok_passed']} succeeded), "
                  f"{f['disconnect_requests']} that hang up after their first chunk, "
                  f"{f['malformed_requests']} malformed ({f['malformed_passed']} answered 4xx "
                  f"in OpenAI's error shape); {f['responses_5xx']} responses were 5xx. After it: "
                  f"/health {f['health_status_after']} ({h.get('status')}, decoding "
                  f"{h.get('decoding')}, queued {h.get('queued')}, cancelled "
                  f"{h.get('cancelled', 0)}), control prompt's greedy text unchanged: "
                  f"{f['control_text_unchanged']}; RSS {f['rss_start_mb']:.0f}→"
                  f"{f['rss_end_mb']:.0f} MB. **{'passed' if f['passed'] else 'FAILED'}**."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--paths", default="dense,default",
                    help="comma-separated: default (the bundle's own), pertoken, static, dense; "
                         "NAME:exact serves it with --exact")
    ap.add_argument("--levels", default="1:8,4:32,16:200",
                    help="concurrency:requests, comma-separated; the first should be 1")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompts", default=str(MTBENCH))
    ap.add_argument("--prompt-words", type=int, default=16,
                    help="cut each prompt to its first N words (0: whole), bounding prefill")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--fault-requests", type=int, default=48)
    ap.add_argument("--out-dir", type=Path, default=REPO / "results")
    ap.add_argument("--add-to", action="store_true",
                    help="append these runs to an existing results/serve_load_NAME.json")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    levels = [tuple(int(x) for x in lv.split(":")) for lv in args.levels.split(",")]
    src = Path(args.prompts)
    prompts = [json.loads(line)["prompt"] for line in src.read_text().splitlines() if line.strip()]
    if args.prompt_words:
        prompts = [" ".join(p.split()[:args.prompt_words]) for p in prompts]
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")

    from transformers import AutoTokenizer  # prompt lengths for the report only

    tok_dir = Path(args.bundle) / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else None
    lengths = [len(tok(p)["input_ids"]) for p in prompts] if tok else []

    runs, fault = [], None
    paths = args.paths.split(",")
    for k, spec in enumerate(paths):
        path, _, mode = spec.partition(":")
        served = Served(args.bundle, None if path == "default" else path, args,
                        exact=mode == "exact")
        try:
            print(f"[{path}] server up in {served.startup_s:.0f} s ({served.path} path)",
                  file=sys.stderr)
            for p in prompts[:2]:  # warm-up: kernels, allocator, first-call paths
                stream(served.port, p, args.max_tokens)
            warm = served.rss_now()
            run = {"path": served.path, "requested": spec, "exact": mode == "exact",
                   "startup_s": round(served.startup_s, 1), "levels": []}
            for c, n in levels:
                lv = run_level(served, prompts, c, n, args.max_tokens)
                print(f"[{path}] C={c} N={n}: {lv['requests_per_s']} req/s, p50 "
                      f"{lv['latency_p50_s']} s, p99 {lv['latency_p99_s']} s, failed "
                      f"{lv['failed']}", file=sys.stderr)
                run["levels"].append(lv)
            solo = dict((i, t) for i, t in run["levels"][0]["texts"])
            for lv in run["levels"]:
                common = [(i, t) for i, t in lv["texts"] if i in solo]
                same = sum(t == solo[i] for i, t in common)
                lv["same_as_solo"] = f"{same}/{len(common)}"
            if k == len(paths) - 1 and args.fault_requests:
                fault = {"path": served.path,
                         **fault_run(served, prompts, args.fault_requests, args.max_tokens)}
                print(f"[{path}] fault run: passed={fault['passed']}", file=sys.stderr)
            rss = [r for _, r in served.rss]
            run["rss_mb"] = {"after_warmup": warm / 2**20, "max": max(rss) / 2**20,
                             "end": served.rss_now() / 2**20,
                             "samples": [round(r / 2**20, 1) for r in rss[::4]]}
            runs.append(run)
        finally:
            served.close()

    info = json.loads((Path(args.bundle) / "report.json").read_text()).get("pertoken", {}) \
        if (Path(args.bundle) / "report.json").is_file() else {}
    report = {"name": args.name, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores "
                         f"(shared), {platform.python_version()}, no GPU",
              "args": {**vars(args), "out_dir": str(args.out_dir)},
              "bundle_info": (f"per-token path at {info['fraction']:.3f} of dense bytes per "
                              f"token" if "fraction" in info else "no per-token plan"),
              "prompt_source": (f"`{src.relative_to(REPO.parent)}`" if src.is_relative_to(
                  REPO.parent) else f"`{src}`"),
              "prompt_tokens_median": statistics.median(lengths) if lengths else None,
              "runs": runs, "fault": fault,
              "commands": [{"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
                            "total_s": round(time.perf_counter() - t_start, 1),
                            "code": code_state(), "started": started}]}
    out = args.out_dir / f"serve_load_{args.name}"
    if args.add_to and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        new = {r["requested"] for r in runs}  # a path measured again replaces its old run
        report = {**old, "runs": [r for r in old["runs"] if r.get("requested") not in new] + runs,
                  "fault": fault or old.get("fault"),
                  "commands": old.get("commands", []) + report["commands"]}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
