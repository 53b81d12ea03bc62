"""Run the steps of a pipeline (trainings, evaluations) side by side on the cores of one machine.

A step is a :class:`Job`: a name for the console, the jobs it waits for, and ``make(done)``, which builds the
call from the results of those jobs (a stage-2 run needs the stage-1 checkpoint's path, known only once stage 1
has finished). :func:`run_jobs` starts every job as soon as its dependencies have finished.

With ``slots=1`` the jobs run one after the other in this process, with every thread torch has. With
``slots >= 2`` they run in that many worker processes, and the running jobs share the slots: two jobs side by
side get one thread each, a job that runs alone gets them all. The tiny models of ``vitavla quickstart`` and
``vitavla evidence`` use a second thread poorly: ``python benchmarks/parallel_jobs.py`` (the stage-2 student
at batch 64 on 2 cores) measured 60.3 ms a step with 2 threads, 75.0 ms with 1, and 79.5 ms each for two
1-thread processes side by side, 1.56 times the steps per second. An ``exclusive`` job (one that nothing else
can run beside, such as the teacher every student waits for) waits for the others and runs alone.

A job's share (:func:`cpu_share`) is set when it starts and changes when another job starts or ends. A
training follows it at every step (:func:`follow_share`), so a stage-2 run that ends up alone takes the idle
core; a rollout sizes its simulator pool by its share when it starts and keeps that pool.

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


_SHARE = None
"""In a worker process: the shared integer through which the parent sets this worker's slots."""


def cpu_share() -> int | None:
    """The slots (threads, or simulator processes) the job running in this worker may use now; None outside
    a worker (``slots=1`` runs jobs in the calling process, which keeps its own settings)."""
    return None if _SHARE is None else int(_SHARE.value)


def follow_share() -> int | None:
    """Set torch's thread count to :func:`cpu_share` if it changed (a training calls this every step); returns
    the share, None outside a worker."""
    share = cpu_share()
    if share is not None:
        import torch

        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
    return share


def _worker(tasks, results, share) -> None:
    """A worker process: third-party output into the parent's log, then jobs until ``None``, each with the
    threads of its share."""
    global _SHARE
    import torch  # noqa: F401  (imported now, while idle, not when the first job is waiting)

    from vitavla.console import route_from_env

    _SHARE = share
    route_from_env()  # third-party output into the parent's log file, as in the parent
    for payload in iter(tasks.get, None):
        key, fn, args = pickle.loads(payload)
        follow_share()
        try:
            # Pickled here: a value that does not pickle is this job's error, not a lost result.
            results.put((key, "ok", pickle.dumps(fn(*args))))
        except SystemExit as e:
            results.put((key, "exit", str(e.code)))
        except BaseException as e:  # sent as text: not every exception pickles
            results.put((key, "error", f"{type(e).__name__}: {e}"))


class _Workers:
    """``n`` spawned worker processes, each with its own task queue: a job goes to a worker that is idle, so
    it starts at once (a shared queue would let a busy worker take it after its current job)."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(n)]
        self.shares = [ctx.Value("i", 1) for _ in range(n)]
        # Not daemons: a worker starts its own simulator processes for rollouts.
        self.procs = [ctx.Process(target=_worker, args=(q, self.results, v), daemon=False)
                      for q, v in zip(self.queues, self.shares)]
        for proc in self.procs:
            proc.start()
        self.busy: dict[int, str] = {}

    def submit(self, key: str, fn: Callable[..., Any], args: tuple, share: int) -> None:
        """Queue a job on an idle worker, with its share set first (the worker reads it at once)."""
        try:  # here, not in the queue's feeder thread, where a failure would lose the job and hang the run
            payload = pickle.dumps((key, fn, args))
        except Exception as e:
            raise JobError(f"job {key!r} cannot reach a worker process: its call does not pickle ({e}); use a "
                           "module-level function and plain arguments") from e
        worker = next(i for i in range(len(self.procs)) if i not in self.busy)
        self.busy[worker] = key
        self.shares[worker].value = share
        self.queues[worker].put(payload)

    def set_shares(self, shares: dict[str, int]) -> None:
        """Give running jobs new shares (``{job: slots}``); their trainings follow at their next step."""
        where = {key: worker for worker, key in self.busy.items()}
        for key, n in shares.items():
            self.shares[where[key]].value = n

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


def run_jobs(jobs: list[Job], slots: int = 1, log: Callable[[str], None] = print,
             on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``jobs`` as their dependencies allow, up to ``slots`` at a time; returns ``{name: result}``.

    Of the jobs ready at once, the earlier in ``jobs`` starts first. ``log`` gets one line when a job starts
    and one when it ends (with its wall time). ``on_done(name, done)`` is called in this process after each
    job ends, with every result so far (to save what has finished while the rest still runs)."""
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
            if on_done is not None:
                on_done(job.name, done)
        return done

    running: dict[str, tuple[Job, float]] = {}
    workers = _Workers(slots)
    try:
        while pending or running:
            exclusive_running = any(j.exclusive for j, _ in running.values())
            starting: list[tuple[Job, Call]] = []
            for job in ready():
                busy = len(running) + len(starting)
                if exclusive_running or busy >= slots or (job.exclusive and busy):
                    break
                pending.remove(job)
                starting.append((job, job.make(done)))
                exclusive_running = job.exclusive
            shares = share_slots([*running, *(j.name for j, _ in starting)], slots)
            workers.set_shares({name: shares[name] for name in running})
            for job, (fn, args) in starting:
                n = shares[job.name]
                # A share is cores: a training's threads, a rollout's simulator processes.
                log(f"[{stamp()}] {job.shown}: started ({'alone, ' if job.exclusive else ''}"
                    f"{n} core{'s' if n > 1 else ''})")
                workers.submit(job.name, fn, args, n)
                running[job.name] = (job, time.perf_counter())
            key, status, value = workers.next_result()
            job, t = running.pop(key)
            if status == "exit":  # a step's own clear message: keep it one line, naming the step
                raise SystemExit(f"{job.shown}: {value}")
            if status == "error":
                raise JobError(f"job {job.shown!r} failed: {value}")
            done[job.name] = pickle.loads(value)
            log(f"[{stamp()}] {job.shown}: finished in {time.perf_counter() - t:.0f} s")
            if on_done is not None:
                on_done(job.name, done)
    except BaseException:
        workers.close(now=True)
        raise
    workers.close()
    log(f"[{stamp()}] {len(jobs)} jobs in {time.perf_counter() - start0:.0f} s on {slots} slots")
    return done


def share_slots(names: list[str], slots: int) -> dict[str, int]:
    """Split ``slots`` between the running jobs ``names`` (in the order they started): equal shares, the
    remainder to the earliest, at least one each."""
    if not names:
        return {}
    base, extra = divmod(slots, len(names))
    return {name: max(1, base + (i < extra)) for i, name in enumerate(names)}


def _run_named(job: Job, fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:
        raise JobError(f"job {job.shown!r} failed: {type(e).__name__}: {e}") from e


__all__ = ["Job", "JobError", "check_jobs", "cpu_share", "follow_share", "run_jobs", "share_slots"]
