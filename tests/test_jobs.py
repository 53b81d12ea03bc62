"""vitavla.jobs: dependency order, side-by-side workers, exclusive jobs and errors that name the job."""

import os
import time

import pytest

from vitavla.jobs import Job, JobError, check_jobs, follow_share, run_jobs, share_slots


def _span(name: str, seconds: float, seen: tuple = ()) -> dict:
    """A job's trace: when it ran, in which process, with how many torch threads, and what it was given."""
    import torch

    start = time.time()
    time.sleep(seconds)
    return {"name": name, "start": start, "end": time.time(), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "seen": seen}


def _fail(message: str) -> None:
    raise ValueError(message)


def _exit(message: str) -> None:
    raise SystemExit(message)


def _job(name: str, deps: tuple = (), seconds: float = 0.0, exclusive: bool = False) -> Job:
    # make() receives the finished jobs' results: the trace records which ones it saw
    return Job(name, lambda done: (_span, (name, seconds, tuple(sorted(done)))), deps, exclusive)


def test_check_jobs_names_duplicates_missing_dependencies_and_cycles():
    with pytest.raises(ValueError, match="two jobs are called 'a'"):
        check_jobs([_job("a"), _job("a")])
    with pytest.raises(ValueError, match=r"job 'b' waits for \['x'\]"):
        check_jobs([_job("a"), _job("b", ("x",))])
    with pytest.raises(ValueError, match="wait for each other in a cycle"):
        check_jobs([_job("a", ("b",)), _job("b", ("a",))])
    with pytest.raises(ValueError, match="slots must be >= 1"):
        run_jobs([_job("a")], slots=0)


def test_one_slot_runs_in_this_process_in_dependency_order():
    lines = []
    done = run_jobs([_job("c", ("a", "b")), _job("a"), _job("b", ("a",))], slots=1, log=lines.append)
    assert [done[n]["pid"] for n in "abc"] == [os.getpid()] * 3
    assert done["a"]["end"] <= done["b"]["start"] and done["b"]["end"] <= done["c"]["start"]
    assert done["b"]["seen"] == ("a",) and done["c"]["seen"] == ("a", "b")  # make() saw its dependencies' results
    assert [line.split("] ")[1] for line in lines] == ["a: started", "a: finished in 0 s", "b: started",
                                                       "b: finished in 0 s", "c: started", "c: finished in 0 s"]


def test_two_slots_run_independent_jobs_side_by_side_on_one_thread_each():
    jobs = [_job("root", exclusive=True), _job("x", ("root",), 1.5), _job("y", ("root",), 1.5),
            _job("z", ("x", "y"))]
    lines = []
    done = run_jobs(jobs, slots=2, log=lines.append)
    root, x, y, z = (done[n] for n in ("root", "x", "y", "z"))
    # side by side one thread each; alone (the exclusive root, and z once x and y are done) both slots
    assert root["threads"] == 2 and x["threads"] == y["threads"] == 1 and z["threads"] == 2
    started = [line.split("] ")[1] for line in lines if "started" in line]
    assert started == ["root: started (alone, 2 cores)", "x: started (1 core)", "y: started (1 core)",
                       "z: started (2 cores)"]
    assert os.getpid() not in {root["pid"], x["pid"], y["pid"]} and x["pid"] != y["pid"]
    assert root["end"] <= min(x["start"], y["start"])
    assert x["start"] < y["end"] and y["start"] < x["end"]  # they overlapped
    assert z["start"] >= max(x["end"], y["end"])


@pytest.mark.parametrize("slots", [1, 2])
def test_on_done_sees_each_finished_job_with_the_results_so_far(slots):
    # The evidence run saves a seed as soon as its jobs are done, while later seeds still run.
    calls = []
    jobs = [_job("a", seconds=0.2), _job("b", ("a",)), _job("c", ("a",), 0.6)]
    done = run_jobs(jobs, slots=slots, log=lambda line: None,
                    on_done=lambda name, so_far: calls.append((name, sorted(so_far))))
    assert calls == [("a", ["a"]), ("b", ["a", "b"]), ("c", ["a", "b", "c"])]
    assert sorted(done) == ["a", "b", "c"]


def test_of_the_ready_jobs_the_earlier_listed_starts_first():
    # One slot: "first" and "second" are both ready after "root"; their order in the list decides.
    jobs = [_job("root"), _job("first", ("root",)), _job("second", ("root",))]
    done = run_jobs(list(reversed(jobs[1:])) + [jobs[0]], slots=1, log=lambda line: None)
    assert done["second"]["end"] <= done["first"]["start"]
    done = run_jobs(jobs, slots=1, log=lambda line: None)
    assert done["first"]["end"] <= done["second"]["start"]


def test_an_exclusive_job_waits_for_running_ones_and_runs_alone():
    jobs = [_job("a", seconds=1.0), _job("b", seconds=0.2), _job("solo", ("b",), 0.5, exclusive=True)]
    done = run_jobs(jobs, slots=2, log=lambda line: None)
    assert done["solo"]["start"] >= done["a"]["end"] and done["solo"]["threads"] == 2


@pytest.mark.parametrize("slots", [1, 2])
def test_a_failing_job_stops_the_run_with_its_name(slots):
    jobs = [_job("ok"), Job("stage 2", lambda done: (_fail, ("bad batch",)), ("ok",)), _job("after", ("stage 2",))]
    with pytest.raises(JobError, match="job 'stage 2' failed: ValueError: bad batch"):
        run_jobs(jobs, slots=slots, log=lambda line: None)
    if slots == 2:  # a call that cannot reach a worker is an error at once, not a run that waits forever
        with pytest.raises(JobError, match="job 'local' cannot reach a worker process: its call does not pickle"):
            run_jobs([Job("local", lambda done: (lambda: None, ()))], slots=2, log=lambda line: None)
    # A step's own clean exit message stays one line, naming the step.
    jobs = [Job("teacher", lambda done: (_exit, ("no teacher.safetensors",)), label="teacher training")]
    with pytest.raises(SystemExit, match="no teacher.safetensors"):
        run_jobs(jobs, slots=slots, log=lambda line: None)


def _watch_share(marker: str, timeout: float = 60.0) -> list[int]:
    """Follow the worker's share as a training does every step, from before ``marker`` is written until the
    share has reached 2 (or ``timeout``): the thread counts seen, in order."""
    import torch
    from pathlib import Path

    follow_share()
    seen, end = [torch.get_num_threads()], time.time() + timeout
    Path(marker).touch()
    while time.time() < end and seen[-1] < 2:
        follow_share()
        if seen[-1] != torch.get_num_threads():
            seen.append(torch.get_num_threads())
        time.sleep(0.02)
    return seen


def _end_after(marker: str, seconds: float, timeout: float = 60.0) -> None:
    """Run until ``seconds`` after ``marker`` appears: the partner of :func:`_watch_share` ends only once the
    watcher is running, however slowly the worker processes start on a loaded machine."""
    from pathlib import Path

    end = time.time() + timeout
    while not Path(marker).exists() and time.time() < end:
        time.sleep(0.02)
    time.sleep(seconds)


def test_a_job_left_alone_takes_the_freed_slot_while_it_runs(tmp_path):
    assert share_slots(["a", "b", "c"], 2) == {"a": 1, "b": 1, "c": 1}  # never below one
    assert share_slots(["a", "b"], 5) == {"a": 3, "b": 2} and share_slots([], 2) == {}
    assert follow_share() is None  # outside a worker: this process keeps its own threads
    marker = str(tmp_path / "long_started")
    jobs = [Job("short", lambda done: (_end_after, (marker, 0.5))),
            Job("long", lambda done: (_watch_share, (marker,)))]
    done = run_jobs(jobs, slots=2, log=lambda line: None)
    assert done["long"] == [1, 2]  # one thread beside "short", both once it ended
