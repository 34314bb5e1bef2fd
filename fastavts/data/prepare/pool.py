"""prepare's crash-isolating pool: inputs go to spawned worker processes; a worker that dies
inside FFmpeg, or a job stuck past its time, tears the pool down and hands back what was in
flight, so the parent can retry each alone and name the culprit."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .worker import process_one, worker_init


def run_pool(jobs: list[dict], workers: int, on_result: Callable,
              hang_s: float) -> tuple[list, list]:
    """Run jobs in a process pool, calling on_result(job, result) as they finish. If a worker
    dies (a crash inside FFmpeg) or a job runs past `hang_s` (stuck inside FFmpeg, where the
    worker's own timeout check cannot run), the pool is torn down and this returns
    (jobs in flight, jobs not started); a hung job is marked job['hung'] = True."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=worker_init,
                               initargs=(os.getpid(),))
    it = iter(jobs)
    inflight: dict = {}
    running_since: dict = {}

    def salvage(first: list) -> tuple[list, list]:
        crashed = list(first)
        for f2, j2 in inflight.items():
            if f2.done() and not f2.cancelled() and f2.exception() is None:
                on_result(j2, f2.result())
            else:
                crashed.append(j2)
        return crashed, list(it)

    try:
        def fill():
            while len(inflight) < 2 * workers:
                j = next(it, None)
                if j is None:
                    return
                inflight[pool.submit(process_one, j)] = j

        fill()
        while inflight:
            done, _ = wait(inflight, timeout=1.0, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for fut in done:
                j = inflight.pop(fut)
                running_since.pop(fut, None)
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    return salvage([j])
                on_result(j, res)
            # `running` starts when a job is handed to the workers' queue, at most one job
            # before a worker takes it: hence hang_s allows for two jobs' time.
            for fut in inflight:
                if fut.running():
                    running_since.setdefault(fut, now)
            hung = [f for f in inflight if now - running_since.get(f, now) > hang_s]
            if hung:
                for f in hung:
                    inflight[f]["hung"] = True
                _terminate(pool)
                return salvage([])
            fill()
        return [], []
    finally:
        if inflight:
            _terminate(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate(pool: ProcessPoolExecutor) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def _noop() -> bool:
    return True


def check_workers_start() -> None:
    """Before blaming an input for a dead worker, make sure workers can run at all."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"),
                                 initializer=worker_init,
                                 initargs=(os.getpid(),)) as pool:
            pool.submit(_noop).result(timeout=120)
    except Exception as e:
        raise RuntimeError(f"prepare's worker processes do not start ({type(e).__name__}: {e}); "
                           f"run from a script or the fastavts command, not from stdin, or use "
                           f"prepare.workers=1") from None


