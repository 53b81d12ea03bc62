"""Success counts of an episode evaluation: one torchmetrics ``Metric`` for the in-process runner and for
Lightning's test loop, and the one summary both report (``results.json``'s numbers).

Counts are a (tasks, 3) integer tensor of successes / error-free episodes / crashed episodes, summed across
processes (``dist_reduce_fx="sum"``): with one results file per rank, ``compute()`` is one all-reduce that
every rank issues in the same order, even a rank whose episodes all crashed.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from vitavla.rollout.stats import success_ci95

KINDS = ("successes", "episodes", "errors")


class EpisodeCounts(Metric):
    """Per-task counts (successes, error-free episodes, crashed episodes), summed across processes."""

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        # int64: counts stay exact, and NCCL/Gloo both all-reduce it.
        self.add_state("counts", torch.zeros(num_tasks, len(KINDS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, record: dict | None = None) -> None:
        """Add one final episode record; ``None`` only marks the metric as updated (a rank with no episodes
        still holds a valid all-zero count, and compute() must not warn or skip the collective)."""
        if record is None:
            return
        if record["error"] is not None:
            self.counts[record["task"], 2] += 1
        else:
            self.counts[record["task"], 1] += 1
            self.counts[record["task"], 0] += int(bool(record["success"]))

    def compute(self) -> torch.Tensor:
        return self.counts


def summary_from_counts(counts: torch.Tensor, task_names: list[str]) -> dict:
    """``{"success_rate", "success_ci95", "successes", "episodes", "errors", "per_task": {t: ...}}`` from
    (tasks, 3) counts. A task without any record was not evaluated (not in the specs, e.g.
    ``data.init_args.tasks``) and is left out. A rate with no error-free episode behind it is None (JSON
    null), not a made-up 0; ``success_ci95`` is its 95% Wilson interval ``[lo, hi]``."""
    per_task, total = {}, dict.fromkeys(KINDS, 0)
    for t, name in enumerate(task_names):
        c = {k: int(counts[t, i]) for i, k in enumerate(KINDS)}
        if not any(c.values()):
            continue
        for k in KINDS:
            total[k] += c[k]
        rate = c["successes"] / c["episodes"] if c["episodes"] else None
        per_task[t] = {"name": name, **c, "success_rate": rate,
                       "success_ci95": success_ci95(c["successes"], c["episodes"])}
    rate = total["successes"] / total["episodes"] if total["episodes"] else None
    return {"success_rate": rate, "success_ci95": success_ci95(total["successes"], total["episodes"]),
            **total, "per_task": per_task}


def summarize(records: list[dict], task_names: list[str]) -> dict:
    """:func:`summary_from_counts` of final episode records (summed across processes under DDP)."""
    metric = EpisodeCounts(len(task_names))
    metric.update(None)
    for record in records:
        metric.update(record)
    return summary_from_counts(metric.compute(), task_names)


__all__ = ["EpisodeCounts", "KINDS", "summarize", "summary_from_counts"]
