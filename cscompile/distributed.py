"""Data-parallel builds on torch.distributed: calibration work sharded over ranks, reduced in a
fixed order so that any number of ranks writes the bundle one process would.

How bit-identity is kept: work is cut into items that do not depend on how many ranks there
are (one prompt, or one fixed chunk of prompts), item i runs on rank i % world, each rank
returns its items' partial results (rows, sums, counts), `RankGroup.gather` all-gathers them
(gloo, `all_gather_object`) and every rank reduces them in global item order. A one-process
build is the same code with world size 1 (no collective), so there is one implementation.
Everything else (loading, clustering, supports, sketches, writing) is cheap next to the
calibration forwards and runs replicated on every rank; only rank 0 writes the bundle.

Launching: `cscompile build --workers N` starts N local ranks (`spawn_ranks`: loopback,
a free port, every rank watched; one dying ends the others and the build), or every rank
is started by `torchrun` (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
on one machine or several; `launched_world` sees that and `init_group` joins its group.

Bit-identity holds for equal per-rank settings: the same torch version and the same number
of threads per rank (a GEMM's blocking, and so its rounding, may depend on the thread count).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import errors
from .errors import BuildError, UserInputError, one_line

# A test hook: "RANK:PHASE" makes that rank exit (code 3, no cleanup) when a build phase
# whose name starts with PHASE begins, as a crashed or killed machine would.
FAIL_ENV = "CSCOMPILE_FAIL_AT"
# Seconds a collective waits for a silent peer before failing (a remote machine that hangs
# rather than dies; a dead local rank is noticed at once by spawn_ranks' monitor).
TIMEOUT_ENV = "CSCOMPILE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
MAX_LOCAL_WORKERS = 64
PEER_GRACE_S = 5.0  # after a rank fails, how long its peers get to exit on their own


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the build: rank `rank` of `world` (world 1: no collectives)."""

    rank: int = 0
    world: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """The items of range(n) this rank computes (round robin: prompts of every length
        spread evenly)."""
        return list(range(self.rank, n, self.world))

    def gather(self, local: dict[int, object], n: int) -> list:
        """Every rank's {item: partial result}, on every rank, as a list in item order 0..n-1."""
        parts = [local]
        if self.world > 1:
            import torch.distributed as dist

            parts = [None] * self.world
            dist.all_gather_object(parts, local)
        merged = {}
        for part in parts:
            merged.update(part)
        missing = [i for i in range(n) if i not in merged]
        if missing:
            raise BuildError(f"ranks returned no result for items {missing[:5]} of {n}")
        return [merged[i] for i in range(n)]

    def map(self, n: int, fn) -> list:
        """[fn(0), ..., fn(n-1)], each computed by the rank that owns it, on every rank."""
        return self.gather({i: fn(i) for i in self.mine(n)}, n)


SINGLE = RankGroup()


def fail_hook(group: RankGroup, phase: str) -> None:
    """Exit at once if FAIL_ENV names this rank and phase (tests of a rank dying mid-build)."""
    spec = os.environ.get(FAIL_ENV)
    if not spec or ":" not in spec:
        return
    rank, prefix = spec.split(":", 1)
    if rank.strip() == str(group.rank) and phase.startswith(prefix):
        sys.stderr.flush()
        os._exit(3)


# ----------------------------------------------------------------------------- torchrun
def launched_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or any env:// launcher)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    except ValueError:
        raise UserInputError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE="
                             f"{os.environ['WORLD_SIZE']!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserInputError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return world


def init_group(rank: int, world: int) -> RankGroup:
    """Join the gloo process group (env:// rendezvous: MASTER_ADDR / MASTER_PORT)."""
    import torch.distributed as dist

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserInputError(f"{var} is not set: launch with torchrun, or set MASTER_ADDR "
                                 f"and MASTER_PORT to rank 0's address and a free port")
    if world > 1 and not dist.is_initialized():
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise UserInputError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} must be a number "
                                 f"of seconds") from None
        try:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        except Exception as e:  # rendezvous: unreachable master, port taken, timeout
            raise BuildError(f"rank {rank} of {world} could not join the build group at "
                             f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                             f"({one_line(str(e), 200)})") from None
    return RankGroup(rank, world)


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- local ranks
def parse_workers(text: str) -> int:
    """--workers as typed: a whole number of local ranks, else one clear line."""
    try:
        workers = int(str(text).strip())
    except ValueError:
        raise UserInputError(f"--workers must be a whole number of local ranks (1.."
                             f"{MAX_LOCAL_WORKERS}), got {text!r}") from None
    return check_workers(workers)


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise UserInputError(f"--workers must be an integer, got {workers!r}")
    if not 1 <= workers <= MAX_LOCAL_WORKERS:
        raise UserInputError(f"--workers must be in 1..{MAX_LOCAL_WORKERS}, got {workers}")
    return workers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, threads: int, target: str, kwargs: dict,
               status_dir: str) -> None:
    """One spawned rank: join the group, run `target` (module:function), record the result
    (rank 0) or the error, exit non-zero on failure."""
    import importlib

    import torch

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.set_num_threads(threads)
    status = Path(status_dir)
    try:
        group = init_group(rank, world)
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(group=group, **kwargs)
        if rank == 0:
            (status / "result.json").write_text(json.dumps(result))
        (status / f"done-{rank}").touch()  # past the last collective: its work is complete
        fail_hook(group, "teardown")
    except BaseException as e:  # noqa: BLE001 - recorded for the parent, then exit non-zero
        kind = type(e).__name__ if isinstance(e, errors.CsError) else None
        msg = str(e) if kind else one_line(traceback.format_exc().strip().splitlines()[-1])
        (status / f"error-{rank}.json").write_text(json.dumps({"kind": kind, "message": msg}))
        sys.exit(1)
    finally:
        leave_group()


def mark_phase(status_dir: str | None, rank: int, phase: str) -> None:
    """Record the phase a rank is in, so a rank that dies can be named with its phase."""
    if status_dir:
        Path(status_dir, f"phase-{rank}").write_text(phase)


def spawn_ranks(world: int, target: str, kwargs: dict, threads: int | None = None) -> dict:
    """Run target(group=..., status_dir=..., **kwargs) on `world` local ranks over loopback;
    rank 0's JSON result. Any rank failing ends every rank and raises one clear error."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    import torch

    threads = threads or max(1, torch.get_num_threads() // world)
    ctx = mp.get_context("spawn")
    _quiet_resource_tracker()
    with tempfile.TemporaryDirectory(prefix="cscompile-ranks-") as status_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world, port, threads, target,
                                   {**kwargs, "status_dir": status_dir}, status_dir))
                 for r in range(world)]
        # A rank that finished its work can still abort while tearing down gloo ("terminate
        # called without an active exception", seen in one CI run); the build has succeeded.
        def _done(p) -> bool:
            return Path(status_dir, f"done-{procs.index(p)}").exists()

        try:
            for p in procs:
                p.start()
            running, first_failed = list(procs), None
            while running and first_failed is None:
                done = wait([p.sentinel for p in running])
                for p in [p for p in running if p.sentinel in done]:
                    p.join()
                    running.remove(p)
                    if p.exitcode != 0 and first_failed is None and not _done(p):
                        first_failed = p
        finally:
            # a failed rank ends the build. Its peers usually notice (gloo: connection closed)
            # and exit on their own within moments; the ones still waiting are stopped.
            wait([p.sentinel for p in procs if p.is_alive()], timeout=PEER_GRACE_S)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join()
        if first_failed is not None:
            raise _rank_failure(procs, first_failed, status_dir)
        return json.loads(Path(status_dir, "result.json").read_text())


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (shared by the ranks) with its shutdown
    warning off: a rank that crashes leaves a semaphore the tracker frees, and its warning
    would bury the build's one-line error."""
    from multiprocessing import resource_tracker

    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning"
    try:
        resource_tracker.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved


def _rank_failure(procs, first_failed, status_dir: str) -> Exception:
    """One error for the whole build. A rank's own input error wins (every rank meets it);
    else the first rank that died without a record (its peers' errors are only its echo);
    else the first recorded error."""
    status = Path(status_dir)
    records = {}
    for r in range(len(procs)):
        f = status / f"error-{r}.json"
        if f.exists():
            records[r] = json.loads(f.read_text())
    for r, rec in sorted(records.items()):
        if rec["kind"]:
            cls = getattr(errors, rec["kind"], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.CsError)):
                cls = BuildError
            return cls(rec["message"])
    r = procs.index(first_failed)
    if r in records:  # it may have failed only because a peer died: name the dead peer
        # (one with no record that we did not stop ourselves: a crash, os._exit, an OOM kill)
        died = [i for i, p in enumerate(procs) if i not in records
                and p.exitcode not in (0, None, -signal.SIGTERM)]
        r = died[0] if died else r
    phase_file = status / f"phase-{r}"
    phase = phase_file.read_text() if phase_file.exists() else "start-up"
    if r in records:
        return BuildError(f"build rank {r} of {len(procs)} failed during '{phase}': "
                          f"{records[r]['message']}; no bundle written")
    return BuildError(f"build rank {r} of {len(procs)} died (exit code {procs[r].exitcode}) "
                      f"during '{phase}'; no bundle written")
