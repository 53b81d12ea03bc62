"""CALVIN long-horizon chains in Lightning's test loop: ``vitavla test --config configs/eval_calvin.yaml``.

:class:`vitavla.rollout.calvin_datamodule.CalvinRolloutDataModule` yields one :class:`EpisodeSpec` per chain
(task 0, episode = chain index); :class:`CalvinRolloutTestCallback` reuses the generic rollout callback
(resume records, policy wrapper, normalizer check, per-rank fsync'd ``episodes.rank{r}.jsonl``) and changes
only what differs for chains: how one spec is run, what is counted, and what is reported.

Overridden :class:`~vitavla.rollout.lightning.RolloutTestCallback` methods: ``on_test_start`` (extends it:
CALVIN metric, chains, oracle, instructions), ``_one``, ``_wave`` and ``_saved`` (an attempt is a chain
instead of an episode, ``num_envs`` chains at once in subtask waves; resume and retries stay the base
class's :func:`~vitavla.rollout.ledger.run_attempts`), ``summary``, ``on_test_epoch_end`` and ``write`` (CALVIN's
``avg_seq_len`` / ``chain_sr`` instead of per-task success, ``chain_sr.png``, the first/last sheet of every
chain, and videos of the first ``record_videos`` chains).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from vitavla.rollout import report
from vitavla.rollout.calvin_protocol import (NUM_SUBTASKS, ChainResult, chain_metrics, run_chain_attempt,
                                             run_chain_wave, summarize_chains)
from vitavla.rollout.env import close_quietly
from vitavla.rollout.episode import EpisodeResult, EpisodeSpec
from vitavla.rollout.lightning import RolloutTestCallback
from vitavla.rollout.records import final_record, read_records, record_key

log = logging.getLogger(__name__)


class ChainCounts(Metric):
    """Histogram of error-free chains by subtasks completed in a row (0..5), then crashed chains; summed
    across processes. A histogram is enough for every CALVIN number (sr_1..sr_5, Avg. Len)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("counts", torch.zeros(NUM_SUBTASKS + 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, record: dict | None = None) -> None:
        """Add one final chain record; ``None`` only marks the metric updated (see ``EpisodeCounts``)."""
        if record is None:
            return
        if record["error"] is not None:
            self.counts[NUM_SUBTASKS + 1] += 1
        else:
            self.counts[int(record["completed"])] += 1

    def compute(self) -> torch.Tensor:
        return self.counts


class CalvinRolloutTestCallback(RolloutTestCallback):
    """Runs CALVIN chains for ``rollout_test_step``; attached by ``CalvinRolloutDataModule.setup``."""

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        dm = trainer.datamodule
        self.chains, self.oracle, self.instructions = dm.chains, dm.oracle, dm.instructions
        self.ep_len, self.seed = dm.ep_len, dm.seed
        for key, recs in self.ledger.by_key.items():
            chain = self.chains[key[1]] if 0 <= key[1] < len(self.chains) else None
            if chain is None or any(r.get("subtasks") != chain.subtasks for r in recs):
                raise ValueError(f"{self.out_dir}: records for chain {key[1]} do not match the configured chains "
                                 "(another chain file or num_chains); use a new data.init_args.out_dir")
        self.metrics = ChainCounts().to(pl_module.device)
        self.metrics.update(None)

    def _one(self, wave: list[EpisodeSpec]) -> list[tuple[dict, ChainResult]]:
        """One attempt at a chain on the in-process env; after a crash the env is closed (it restarts on the
        next reset)."""
        (spec,) = wave
        rec, res = run_chain_attempt(self.env, self.policy, self.chains[spec.episode_index], spec.episode_index,
                                     self.oracle, self.instructions, attempt=self.ledger.attempts(spec.key),
                                     seed=spec.seed, ep_len=self.ep_len, executor=self.make_executor(),
                                     normalizer=self.normalizer, image_size=self.image_size,
                                     record_frames=self._records_video(spec))
        if rec["error"] is not None:
            close_quietly(self.env)
        return [(self._named(rec), res)]

    def _wave(self, wave: list[EpisodeSpec]) -> list[tuple[dict, ChainResult]]:
        """One attempt of each chain, concurrently on the pool in subtask waves (:func:`run_chain_wave`)."""
        from vitavla.rollout.parallel import acquire_pool

        if self.pool is None:
            self.pool = acquire_pool(self.env, self.num_envs, timeout=self.env_timeout)
        items = [(s.episode_index, self.chains[s.episode_index], self.ledger.attempts(s.key)) for s in wave]
        done = run_chain_wave(self.pool, self.policy, items, self.instructions, seed=wave[0].seed,
                              ep_len=self.ep_len, executor_factory=self.make_executor,
                              normalizer=self.normalizer, image_size=self.image_size,
                              record_frames=[self._records_video(s) for s in wave])
        return [(self._named(rec), res) for rec, res in done]

    def _named(self, rec: dict) -> dict:
        rec["task_name"] = self.names[0]
        return rec

    def _saved(self, spec: EpisodeSpec, rec: dict, res: ChainResult) -> None:
        """After each recorded chain attempt: its first/last frames and, when recorded, its video."""
        if rec["error"] is not None:
            log.warning("chain %d crashed (attempt %d): %s", spec.episode_index, rec["attempt"], rec["error"])
        if res.first_last is not None:
            report.save_first_last(EpisodeResult(0, spec.episode_index, rec["success"], sum(rec["steps"]),
                                                 rec["error"], first_last=res.first_last),
                                   self.out_dir / "first_last")
        if rec["error"] is None and res.frames is not None:
            frames = report.chain_video_frames(res.frames, res.instructions, rec["steps"], rec["completed"],
                                               title=f"chain {spec.episode_index}")
            name = f"chain{spec.episode_index:04d}_{rec['completed']}of{NUM_SUBTASKS}.mp4"
            report.write_video(frames, self.out_dir / "videos" / name, fps=30)  # CALVIN's control rate

    def summary(self, counts: torch.Tensor) -> dict:
        out = chain_metrics(counts[: NUM_SUBTASKS + 1].tolist())
        out["errors"] = int(counts[NUM_SUBTASKS + 1])
        return out

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self.metrics.compute().cpu()  # all-reduce across processes (every rank calls it)
        self.metrics.reset()
        results = self.summary(counts)
        if results["avg_seq_len"] is not None:
            pl_module.log("test/avg_seq_len", results["avg_seq_len"], batch_size=1, on_epoch=True, sync_dist=True)
            for k, sr in results["chain_sr"].items():
                pl_module.log(f"test/chain_sr{k}", sr, batch_size=1, on_epoch=True, sync_dist=True)
        pl_module.log("test/errors", float(results["errors"]), batch_size=1, on_epoch=True, sync_dist=True)
        trainer.strategy.barrier("calvin_results")  # every rank's records are on disk before rank 0 reads
        if trainer.is_global_zero:
            self.write(trainer, results)
        self.check_evaluated(results["chains"], results["errors"], "chains")

    def write(self, trainer: Trainer, results: dict) -> None:
        dm = trainer.datamodule
        merged: dict[tuple, list[dict]] = {}
        for path in sorted(Path(self.out_dir).glob("episodes.rank*.jsonl")):
            for r in read_records(path):
                merged.setdefault(record_key(r), []).append(r)
        finals = [final_record(merged[s.key]) for s in dm.specs() if s.key in merged]
        with open(self.out_dir / "episodes.jsonl", "w") as f:  # one deduplicated file for reports
            f.writelines(json.dumps(r) + "\n" for r in finals)
        details = summarize_chains(finals)  # task_info and timings; totals come from the synced metric
        results = {**results, "task_info": details["task_info"], "error_details": details["error_details"],
                   "seconds_sim": details["seconds_sim"], "seconds_policy": details["seconds_policy"],
                   "env": type(self.env).__name__, "protocol": getattr(self.env, "protocol", None),
                   "ep_len": self.ep_len, "executor": dm.executor, "ckpt_path": trainer.ckpt_path,
                   "world_size": trainer.world_size, "num_envs": self.num_envs}
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        chart = report.chain_chart(results["chain_sr"], results["avg_seq_len"], results["chains"])
        chart.save(self.out_dir / "chain_sr.png")
        labelled = [{**r, "outcome": report.chain_outcome(r["completed"], r["error"])} for r in finals]
        sheet = report.first_last_sheet(labelled, self.out_dir / "first_last", {0: "CALVIN chains"})
        if sheet is not None:
            sheet.save(self.out_dir / "first_last.png")
        avg = results["avg_seq_len"]
        shown = "n/a" if avg is None else f"{avg:.3f}"
        rates = "" if results["chain_sr"] is None else " ".join(
            f"{k}/5: {sr * 100:.1f}%" for k, sr in results["chain_sr"].items())
        rank_zero_info(f"calvin: Avg. Len. {shown} over {results['chains']} chains ({results['errors']} errors) "
                       f"{rates}; results in {self.out_dir}")
