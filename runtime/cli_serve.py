"""`cscompile serve`: an OpenAI-compatible HTTP server over a bundle (or a model, dense).

FastAPI on uvicorn (runtime.openai_api) in front of the continuous-batching engine
(runtime.engine). Registered in cscompile/cli.py with `main.add_command(serve)`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cscompile.errors import friendly_errors


@click.command()
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0: every interface; there is no auth).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--path", "path", type=click.Choice(["pertoken", "static", "dense"]), default=None,
              help="Decode path of every request [default: pertoken when the bundle has one, "
                   "else static; dense for a model].")
@click.option("--backend", type=click.Choice(["auto", "cpu", "torch", "triton"]), default="auto",
              show_default=True, help="As for `cscompile run`.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Requests decoded together (one forward per step); more wait in the queue.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a decode slot; beyond that: 429.")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds a request may take from arrival to its last token (504).")
@click.option("--queue-timeout", "queue_timeout_s", default=60.0, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds a request may wait for a decode slot (503).")
@click.option("--exact", is_flag=True,
              help="Decode every request in a batch of its own (one batch-1 forward per request "
                   "and step): outputs bit-for-bit those of `cscompile run`, less throughput. "
                   "Batched, the per-token path's top-k selections can tip on float "
                   "reordering and change a later token.")
@click.option("--model-name", default=None,
              help="The model id clients send and /v1/models lists [default: TARGET's name].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
@friendly_errors
def serve(target, host, port, path, backend, max_batch, max_queue, timeout_s, queue_timeout_s,
          exact, model_name, log_level, access_log):
    """Serve TARGET (a bundle directory, or a model run dense) over the OpenAI API:
    /v1/completions, /v1/chat/completions, /v1/models, /health.

    Requests decode together: each is prefilled alone, then joins the running batch of its
    path between two decode steps, so its greedy output is what `cscompile run` gives it up
    to float reordering (bit-for-bit with --exact).
    """
    import uvicorn

    from . import load
    from .engine import Engine
    from .openai_api import create_app

    session = load(target, backend=backend)
    engine = Engine(session, path=path, max_batch=max_batch, max_queue=max_queue, exact=exact)
    name = model_name or Path(str(target).rstrip("/")).name or str(target)
    app = create_app(session, engine, name, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s)
    batch = f"max batch {max_batch}" + (" (exact: one row per forward)" if exact else "")
    click.echo(f"serving {name} ({engine.kind} path, backend {session.backend}) on "
               f"http://{host}:{port}/v1 | {batch}, queue {max_queue}, timeout {timeout_s:g} s "
               f"(queued {queue_timeout_s:g} s)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
