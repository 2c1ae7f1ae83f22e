"""Run a function on N local gloo processes (127.0.0.1 only) and collect the results, never hanging.

Used by the tests and by `python -m moe_ext.parallel_bench`. fn(rank, world_size, *args) runs after
init_process_group("gloo") and must be importable by name (a module-level function). Each worker
writes its return value (torch.save) or its traceback to a temporary directory; the parent polls,
terminates every worker as soon as one fails or the deadline passes, and raises.
"""
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail(outdir, rank):
    """Write this rank's traceback (whole, via a rename: the launcher never reads half a file) and exit."""
    path = os.path.join(outdir, f"{rank}.err")
    with open(path + ".tmp", "w") as f:
        f.write(traceback.format_exc())
    os.replace(path + ".tmp", path)
    os._exit(1)


def _worker(rank, world, port, outdir, fn, args, collective_timeout_s, threads):
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout_s))
        try:
            result = fn(rank, world, *args)
        except BaseException:
            # Before the process group goes: closing it fails the peers' collectives at once, and the
            # launcher then stops this process, which would lose the traceback that explains it all.
            _fail(outdir, rank)
        dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        _fail(outdir, rank)


def launch(fn, world_size: int, *args, timeout_s: float = 120.0, collective_timeout_s: float = 60.0,
           threads: int = 1):
    """Run fn(rank, world_size, *args) on world_size spawned processes; returns the list of results.
    Raises RuntimeError with the failing ranks' tracebacks, or on timeout (after terminating all)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moe_ext_dist_") as outdir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, outdir, fn, args, collective_timeout_s,
                                                   threads), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed = timed_out = False
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    failed = True
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                for p in procs:
                    if p.is_alive():
                        p.join(timeout=0.05)
                        break
        finally:
            if failed:  # a short grace: the other failing ranks write their tracebacks and exit themselves
                grace = time.monotonic() + 2.0
                while any(p.is_alive() for p in procs) and time.monotonic() < grace:
                    time.sleep(0.05)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        errors = []
        for r in range(world_size):
            path = os.path.join(outdir, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"--- rank {r} ---\n{f.read()}")
        if timed_out:
            raise RuntimeError(f"moe_ext: distributed run of {fn.__name__} timed out after {timeout_s} s\n"
                               + "\n".join(errors))
        if failed or errors or any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"moe_ext: distributed run of {fn.__name__} failed (exit codes {codes})\n"
                               + "\n".join(errors))
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
