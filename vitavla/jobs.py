"""Run the steps of a pipeline (trainings, evaluations) side by side on the cores of one machine.

A step is a :class:`Job`: a name for the console, the jobs it waits for, and ``make(done)``, which builds the
call from the results of those jobs (a stage-2 run needs the stage-1 checkpoint's path, known only once stage 1
has finished). :func:`run_jobs` starts every job as soon as its dependencies have finished.

With ``slots=1`` the jobs run one after the other in this process, with every thread torch has. With
``slots >= 2`` they run in that many worker processes, one thread each: the tiny models of ``vitavla
quickstart`` and ``vitavla evidence`` use a second thread poorly. ``python benchmarks/parallel_jobs.py`` (the
stage-2 student at batch 64 on 2 cores) measured 60.3 ms a step with 2 threads, 75.0 ms with 1, and 79.5 ms
each for two 1-thread processes side by side: 1.56 times the steps per second. An ``exclusive`` job (one that
nothing else can run beside, such as the teacher every student waits for) runs alone with ``slots`` threads.

Workers are spawned, not forked (torch's thread pools and EGL contexts are unsafe after fork), route
third-party output into the parent's log file like the simulator workers (:func:`vitavla.console.route_from_env`),
and start their own simulator processes for rollouts. A job that raises stops the run: the jobs not yet
started are cancelled, the running ones are stopped, and the error names the job.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

Call = tuple[Callable[..., Any], tuple]
"""A module-level function (it must pickle to reach a worker) and its positional arguments."""


@dataclass
class Job:
    """One step: ``make(done)`` returns the call to run, given ``done``, the results of finished jobs by name."""

    name: str
    make: Callable[[dict[str, Any]], Call]
    deps: tuple[str, ...] = ()
    exclusive: bool = False
    """Runs with nothing beside it, on every slot's thread (the root of a pipeline: every other job waits)."""
    label: str = ""
    """What the console calls it (default: ``name``)."""

    @property
    def shown(self) -> str:
        return self.label or self.name


class JobError(RuntimeError):
    """A job raised; the message names it and gives its error."""


def _worker(tasks, results) -> None:
    """A worker process: one thread, third-party output into the parent's log, then jobs until ``None``."""
    import torch

    from vitavla.console import route_from_env

    torch.set_num_threads(1)
    route_from_env()  # third-party output into the parent's log file, as in the parent
    for payload in iter(tasks.get, None):
        key, fn, args, threads = pickle.loads(payload)
        torch.set_num_threads(threads)
        try:
            # Pickled here: a value that does not pickle is this job's error, not a lost result.
            results.put((key, "ok", pickle.dumps(fn(*args))))
        except SystemExit as e:
            results.put((key, "exit", str(e.code)))
        except BaseException as e:  # sent as text: not every exception pickles
            results.put((key, "error", f"{type(e).__name__}: {e}"))
        finally:
            torch.set_num_threads(1)


class _Workers:
    """``n`` spawned worker processes, each with its own task queue: a job goes to a worker that is idle, so
    it starts at once (a shared queue would let a busy worker take it after its current job)."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(n)]
        # Not daemons: a worker starts its own simulator processes for rollouts.
        self.procs = [ctx.Process(target=_worker, args=(q, self.results), daemon=False) for q in self.queues]
        for proc in self.procs:
            proc.start()
        self.busy: dict[int, str] = {}

    def submit(self, key: str, fn: Callable[..., Any], args: tuple, threads: int) -> None:
        try:  # here, not in the queue's feeder thread, where a failure would lose the job and hang the run
            payload = pickle.dumps((key, fn, args, threads))
        except Exception as e:
            raise JobError(f"job {key!r} cannot reach a worker process: its call does not pickle ({e}); use a "
                           "module-level function and plain arguments") from e
        worker = next(i for i in range(len(self.procs)) if i not in self.busy)
        self.busy[worker] = key
        self.queues[worker].put(payload)

    def next_result(self) -> tuple[str, str, Any]:
        """The next finished job's ``(key, status, value)``; a worker that died takes its job down with it."""
        while True:
            try:
                key, status, value = self.results.get(timeout=5)
            except queue.Empty:
                for worker, key in list(self.busy.items()):
                    if not self.procs[worker].is_alive():
                        del self.busy[worker]
                        return key, "error", f"its worker process died (exit code {self.procs[worker].exitcode})"
                continue
            self.busy = {w: k for w, k in self.busy.items() if k != key}
            return key, status, value

    def close(self, now: bool = False) -> None:
        for proc, q in zip(self.procs, self.queues):
            if now and proc.is_alive():
                proc.terminate()  # a training may have an hour left
            elif proc.is_alive():
                q.put(None)
        for proc in self.procs:
            proc.join(timeout=30)


def check_jobs(jobs: list[Job]) -> None:
    """Unique names, dependencies that exist, no cycle: errors naming the job, before anything runs."""
    names = [j.name for j in jobs]
    seen: set[str] = set()
    for j in jobs:
        if j.name in seen:
            raise ValueError(f"two jobs are called {j.name!r}")
        seen.add(j.name)
    for j in jobs:
        missing = [d for d in j.deps if d not in seen]
        if missing:
            raise ValueError(f"job {j.name!r} waits for {missing}, which are not jobs of this run ({names})")
    done: set[str] = set()
    pending = list(jobs)
    while pending:
        ready = [j for j in pending if set(j.deps) <= done]
        if not ready:
            raise ValueError(f"jobs {[j.name for j in pending]} wait for each other in a cycle")
        done |= {j.name for j in ready}
        pending = [j for j in pending if j.name not in done]


def run_jobs(jobs: list[Job], slots: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``jobs`` as their dependencies allow, up to ``slots`` at a time; returns ``{name: result}``.

    ``log`` gets one line when a job starts and one when it ends (with its wall time)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    check_jobs(jobs)
    done: dict[str, Any] = {}
    pending = list(jobs)
    start0 = time.perf_counter()

    def stamp() -> str:
        return time.strftime("%H:%M:%S")

    def ready() -> list[Job]:
        return [j for j in pending if set(j.deps) <= set(done)]

    if slots == 1:
        while pending:
            job = ready()[0]
            pending.remove(job)
            log(f"[{stamp()}] {job.shown}: started")
            t = time.perf_counter()
            fn, args = job.make(done)
            done[job.name] = _run_named(job, fn, args)
            log(f"[{stamp()}] {job.shown}: finished in {time.perf_counter() - t:.0f} s")
        return done

    running: dict[str, tuple[Job, float]] = {}
    workers = _Workers(slots)
    try:
        while pending or running:
            exclusive_running = any(j.exclusive for j, _ in running.values())
            for job in ready():
                if exclusive_running or len(running) >= slots or (job.exclusive and running):
                    break
                pending.remove(job)
                fn, args = job.make(done)
                log(f"[{stamp()}] {job.shown}: started"
                    + (f" (alone, {slots} threads)" if job.exclusive else ""))
                workers.submit(job.name, fn, args, slots if job.exclusive else 1)
                running[job.name] = (job, time.perf_counter())
                exclusive_running = job.exclusive
            key, status, value = workers.next_result()
            job, t = running.pop(key)
            if status == "exit":  # a step's own clear message: keep it one line, naming the step
                raise SystemExit(f"{job.shown}: {value}")
            if status == "error":
                raise JobError(f"job {job.shown!r} failed: {value}")
            done[job.name] = pickle.loads(value)
            log(f"[{stamp()}] {job.shown}: finished in {time.perf_counter() - t:.0f} s")
    except BaseException:
        workers.close(now=True)
        raise
    workers.close()
    log(f"[{stamp()}] {len(jobs)} jobs in {time.perf_counter() - start0:.0f} s on {slots} slots")
    return done


def _run_named(job: Job, fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:
        raise JobError(f"job {job.shown!r} failed: {type(e).__name__}: {e}") from e


__all__ = ["Job", "JobError", "check_jobs", "run_jobs"]
