"""Closed-loop evaluation inside Lightning's test loop: ``vitavla test --config configs/eval_*.yaml``.

A batch is a list of :class:`EpisodeSpec` (see :class:`vitavla.rollout.datamodule.RolloutDataModule`); the
sampler shards specs across processes. :func:`rollout_test_step` runs each spec's episode with the module's
rollout policy and appends the attempt to ``<out_dir>/episodes.rank{r}.jsonl`` (fsync'd), so a killed run
resumes where it stopped and ends with the same totals. With ``RolloutDataModule(num_envs=N)`` a batch holds
up to N specs, run concurrently on an :class:`~vitavla.rollout.parallel.EnvPool` of N simulator processes
with one batched policy call per step; records, retries, metrics and videos are the same as with N = 1.

The policy comes from ``pl_module.rollout_policy()`` when the module defines it, else from
``pl_module.policy``; either goes through :func:`~vitavla.policy_protocol.as_rollout_policy` (a VLAPolicy is
streamed) and must be a :class:`~vitavla.policy_protocol.RolloutPolicy` with ``image_size`` and ``robot``,
and ``select`` when ``num_envs > 1``.

Aggregation across processes: :class:`RolloutTestCallback` owns an :class:`EpisodeCounts` torchmetrics
``Metric`` (a (tasks, 3) integer tensor of successes / episodes / errors, ``dist_reduce_fx="sum"``). It is
created fresh in ``on_test_start`` (so it is reset every run), lives on the callback rather than the
LightningModule (so it never enters a checkpoint or the module's state_dict), and is computed once in
``on_test_epoch_end``: one all-reduce, issued by every rank in the same order, even by a rank whose
episodes all crashed. The resulting global values are then logged with ``self.log(..., sync_dist=True)``
(a mean of identical values, which keeps Lightning's epoch-level DDP contract). Logging per-episode values
with ``sync_dist`` instead would deadlock: a rank that never saw task t (or only saw crashes) would not
log ``test/success_task{t}`` and the ranks' collectives would no longer match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from vitavla.errors import UserFacingError
from vitavla.normalizer import Normalizer
from vitavla.policy_protocol import as_rollout_policy
from vitavla.rollout import report
from vitavla.rollout.counts import KINDS, EpisodeCounts, summary_from_counts  # noqa: F401 (re-exported)
from vitavla.rollout.env import close_quietly
from vitavla.rollout.episode import EpisodeResult, EpisodeSpec
from vitavla.rollout.ledger import Ledger, run_attempts
from vitavla.rollout.records import final_record, read_records, record_key
from vitavla.rollout.runner import episode_record, run_episode

log = logging.getLogger(__name__)


def is_rollout_batch(batch) -> bool:
    """A rollout batch: a non-empty list of :class:`EpisodeSpec` (as ``RolloutDataModule`` collates it)."""
    return isinstance(batch, list) and bool(batch) and all(isinstance(s, EpisodeSpec) for s in batch)


BINDING_FILE = "binding.json"
"""In ``out_dir``: what produced its episode records (see :func:`evaluation_binding`)."""


def _jsonable(value):
    """``value`` as plain JSON (paths, sets and other objects by ``str``), for comparison across runs."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda o: sorted(map(str, o))
                                 if isinstance(o, (set, frozenset)) else str(o)))


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def weights_sha256(ckpt_path: str | Path | None, module: torch.nn.Module) -> str:
    """SHA-256 of the evaluated weights: of the checkpoint file (or every file of an exported policy
    directory, names included) when there is one, else of the module's own tensors (weights that came from
    config paths, e.g. a teacher's file, which can be rewritten in place between two runs)."""
    h = hashlib.sha256()
    path = Path(ckpt_path) if ckpt_path else None
    if path is None and hasattr(module, "path") and Path(str(module.path)).is_dir():
        path = Path(str(module.path))  # ExportedPolicyModule: the CLI passes the directory, not ckpt_path
    if path is not None and path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 23):
                    h.update(chunk)
        return h.hexdigest()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cli_config(trainer: Trainer):
    """The resolved ``vitavla`` config of this run (LightningCLI's SaveConfigCallback holds it), or None
    when the trainer was built in Python."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return cb.config
    return None


def _env_args(env) -> dict | None:
    """The env's constructor arguments where they are known (adapters keep them in ``_args`` to rebuild
    themselves in worker processes; dataclass envs have their init fields)."""
    if isinstance(getattr(env, "_args", None), dict):
        return dict(env._args)
    if dataclasses.is_dataclass(env):
        return {f.name: getattr(env, f.name) for f in dataclasses.fields(env) if f.init}
    return None


def evaluation_binding(trainer: Trainer, pl_module: LightningModule, env, policy) -> dict:
    """What an evaluation's episode records depend on: the evaluated weights (SHA-256), the policy config
    (the model section), the env config and the closed-loop protocol (executor, settling, normalizer use,
    image size). The number of episodes, tasks, retries, parallelism and video settings are left out on
    purpose: records are keyed by episode, so a rerun may extend or narrow the evaluation."""
    dm = trainer.datamodule
    config = _cli_config(trainer)
    if config is not None and config.get("model") is not None:
        model_config = config["model"].as_dict() if hasattr(config["model"], "as_dict") else config["model"]
    else:
        model_config = {"class_path": _qualname(pl_module),
                        "hparams": dict(getattr(pl_module, "hparams", {}))}
    env_config = None
    if config is not None and config.get("data") is not None:
        data = config["data"]
        env_config = data.get("init_args", {}).get("env") if hasattr(data, "get") else None
        env_config = env_config.as_dict() if hasattr(env_config, "as_dict") else env_config
    if env_config is None:
        env_config = {"class_path": _qualname(env), "init_args": _env_args(env)}
    protocol = {name: getattr(dm, name, None) for name in
                ("executor", "ensemble_k", "chunk_steps", "settle_steps", "allow_missing_normalizer")}
    protocol.update(env_protocol=getattr(env, "protocol", None), image_size=int(policy.image_size))
    return _jsonable({"checkpoint": {"sha256": weights_sha256(trainer.ckpt_path, pl_module),
                                     "path": str(trainer.ckpt_path or getattr(pl_module, "path", "") or "")},
                      "policy": model_config, "env": env_config, "protocol": protocol})


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def binding_differences(recorded: dict, current: dict) -> list[str]:
    """``key: now X, recorded Y`` for each setting that differs (the checkpoint's path alone does not: the
    same file may be evaluated from another place)."""
    a, b = _flatten(recorded), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key == "checkpoint.path" or a.get(key) == b.get(key):
            continue
        if key == "checkpoint.sha256":
            now, then = b.get("checkpoint.path") or "no file", a.get("checkpoint.path") or "no file"
            diffs.append(f"checkpoint sha256 {str(b.get(key))[:12]} ({now}), "
                         f"recorded {str(a.get(key))[:12]} ({then})")
        else:
            diffs.append(f"{key}: now {b.get(key)!r}, recorded {a.get(key)!r}")
    return diffs


def check_binding(out_dir: Path, binding: dict) -> None:
    """Bind ``out_dir``'s episode records to ``binding``: refuse (naming the differences) when they were
    produced by another checkpoint, policy, env or protocol, else record it (atomically) before any episode.

    Records without a binding file come from a version before it existed; finished episodes among them
    cannot be attributed, so they are refused too. Error-only records are harmless: errors are always re-run.
    """
    path = out_dir / BINDING_FILE
    start_over = (f"use a new data.init_args.out_dir, or delete {out_dir}/episodes.rank*.jsonl and "
                  f"{BINDING_FILE} to start over")
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except ValueError as err:
            raise UserFacingError(f"{path}: not valid JSON ({err}); {start_over}") from err
        diffs = binding_differences(recorded, binding)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise UserFacingError(f"{out_dir} holds episodes of another evaluation ({shown}); resuming would "
                                  f"mix them into this one's results: {start_over}")
        return
    finished = [p.name for p in sorted(out_dir.glob("episodes.rank*.jsonl"))
                if any(r.get("error") is None for r in read_records(p))]
    if finished:
        raise UserFacingError(f"{out_dir} holds finished episodes ({', '.join(finished)}) without "
                              f"{BINDING_FILE}, so nothing says which checkpoint and settings produced them; "
                              f"{start_over}")
    tmp = path.with_name(f".{BINDING_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(binding, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # every rank writes the same content; a reader never sees half a file


class RolloutTestCallback(Callback):
    """Per-run state of a rollout test: policy wrapper, executor, normalizer, resume records, metrics.

    :class:`~vitavla.rollout.datamodule.RolloutDataModule` attaches it to the trainer in ``setup("test")``; it
    reads its settings (env, executor, out_dir, ...) from ``trainer.datamodule``.
    """

    def __init__(self):
        self.metrics: EpisodeCounts | None = None
        self.ledger: Ledger | None = None
        self.pool = None  # EnvPool of num_envs simulator processes, created on the first batch that needs it

    # -- test start: reset metrics, load what earlier runs finished ------------------------------------
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        self.env = dm.env
        self.out_dir = Path(dm.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"episodes.rank{trainer.global_rank}.jsonl"
        self.retries = dm.retries
        self.names = [self.env.task_name(t) for t in range(self.env.num_tasks)]
        self.num_envs = int(getattr(dm, "num_envs", 1))
        self.policy = self._policy(pl_module, batched=self.num_envs > 1)
        self.image_size = int(self.policy.image_size)
        self.normalizer = self._normalizer(self.policy.robot, pl_module, dm)
        self.env_timeout = getattr(dm, "env_timeout", None)
        self.close_pool()
        self.make_executor = dm.make_executor
        self.settle_steps = dm.settle_steps
        self.videos_per_task = dm.record_videos_per_task
        self.first_episode = getattr(dm, "first_episode", 0)
        # Resume: every rank reads every rank's file, so a run restarted with another world size (hence
        # other shards) still skips whatever any earlier process finished -- but only records of this same
        # evaluation (checkpoint, policy, env, protocol): another checkpoint's episodes must never be reused.
        check_binding(self.out_dir, evaluation_binding(trainer, pl_module, self.env, self.policy))
        self.ledger = Ledger(self.path, self.retries, others=self.out_dir.glob("episodes.rank*.jsonl"))
        self.metrics = EpisodeCounts(self.env.num_tasks).to(pl_module.device)  # NCCL reduces on the GPU
        self.metrics.update(None)
        self.ran = self.wins = 0

    @staticmethod
    def _policy(pl_module: LightningModule, batched: bool = False):
        """The module's own rollout policy (hook ``rollout_policy()``), else its ``policy`` (a VLAPolicy is
        streamed), checked for what this callback uses: ``image_size``, ``robot`` and, when ``batched``
        (``num_envs > 1``), ``select``."""
        name = type(pl_module).__name__
        hook = getattr(pl_module, "rollout_policy", None)
        if callable(hook):
            policy, source = hook(), f"{name}.rollout_policy()"
        elif hasattr(pl_module, "policy"):
            policy, source = pl_module.policy, f"{name}.policy"
        else:
            raise TypeError(f"{name} has neither rollout_policy() nor a policy attribute: closed-loop "
                            "evaluation needs one of them (see vitavla.policy_protocol.RolloutPolicy)")
        return as_rollout_policy(policy, batched=batched, described=True, source=source)

    def _normalizer(self, robot, pl_module: LightningModule, dm) -> Normalizer | None:
        want = robot.arm_dim + robot.gripper_dim
        state = getattr(pl_module, "normalizer_state", None)
        if state is None:
            if not dm.allow_missing_normalizer:
                raise ValueError(
                    f"the checkpoint has no action normalizer, but {type(self.env).__name__} takes raw "
                    "actions; evaluate a checkpoint saved by `vitavla fit` on the benchmark's datamodule (it "
                    "stores checkpoint['normalizer']), or set data.init_args.allow_missing_normalizer=true "
                    "for an env that accepts normalized actions (arm in [-1, 1], gripper 0/1)")
            norm = None
        else:
            norm = Normalizer.from_state_dict(state)
            if norm.arm_dim + norm.gripper_dim != want:
                raise ValueError(f"checkpoint normalizer has {norm.arm_dim} + {norm.gripper_dim} action "
                                 f"values, the policy predicts {robot.arm_dim} + {robot.gripper_dim}")
        if want != self.env.action_dim:
            raise ValueError(f"the policy predicts {want} action values but {type(self.env).__name__} takes "
                             f"{self.env.action_dim}")
        return norm

    # -- one batch -----------------------------------------------------------------------------------
    def _records_video(self, spec: EpisodeSpec) -> bool:
        return spec.episode_index - self.first_episode < self.videos_per_task

    def _saved(self, spec: EpisodeSpec, rec: dict, res: EpisodeResult) -> None:
        """After each recorded attempt: its first/last frames and, for a recorded episode, its video."""
        if res.error is not None:
            log.warning("episode %s crashed (attempt %d): %s", spec, rec["attempt"], res.error)
        # On disk per episode (a few KB), not in memory: rank 0 builds first_last.png from every rank's
        # files at the end, and a resumed run still shows the episodes an earlier run finished.
        report.save_first_last(res, self.out_dir / "first_last")
        if res.error is None and res.frames is not None:
            # Written now, not at the end: a few hundred frames per episode add up over a suite.
            report.save_videos([res], self.out_dir / "videos", per_task=self.videos_per_task,
                               task_names=self.names)

    def _one(self, wave: list[EpisodeSpec]) -> list[tuple[dict, EpisodeResult]]:
        """One attempt on the in-process env; after a crash the env is closed (its state is not trusted;
        the next reset restarts it)."""
        (spec,) = wave
        res = run_episode(self.env, self.policy, self.make_executor(), spec, self.normalizer, self.image_size,
                          self.settle_steps, record_frames=self._records_video(spec))
        if res.error is not None:
            close_quietly(self.env)
        return [(episode_record(spec, res, self.names, self.ledger.attempts(spec.key)), res)]

    def _wave(self, wave: list[EpisodeSpec]) -> list[tuple[dict, EpisodeResult]]:
        """One attempt of each spec, concurrently on the pool (a crashed worker rebuilds its env)."""
        from vitavla.rollout.parallel import acquire_pool, run_wave

        if self.pool is None:
            self.pool = acquire_pool(self.env, self.num_envs, timeout=self.env_timeout)
        results = run_wave(self.pool, self.policy, wave, self.make_executor, self.normalizer, self.image_size,
                           self.settle_steps, record_frames=[self._records_video(s) for s in wave])
        return [(episode_record(s, r, self.names, self.ledger.attempts(s.key)), r) for s, r in zip(wave, results)]

    def run_batch(self, specs: list[EpisodeSpec]) -> list[dict]:
        """Final records of ``specs`` (in order), through :func:`~vitavla.rollout.ledger.run_attempts`: taken
        from an earlier run if finished there, else run now, a crashed attempt recorded and retried up to
        ``retries`` times. With ``num_envs > 1`` the unfinished ones run concurrently on the pool."""
        if len(specs) > self.num_envs > 1:
            raise ValueError(f"a rollout batch has {len(specs)} specs but num_envs={self.num_envs}; the "
                             "RolloutDataModule's batches hold at most num_envs specs")
        if self.num_envs <= 1:
            return run_attempts(specs, self.ledger, self._one, on_attempt=self._saved)
        return run_attempts(specs, self.ledger, self._wave, wave_size=self.num_envs, on_attempt=self._saved)

    def close_pool(self, broken: bool = False) -> None:
        """Stop the simulator processes, or hand them back to an open ``shared_pools()`` block (idempotent);
        ``broken``: after an exception, when a worker may be mid-command, they are stopped in any case."""
        if self.pool is not None:
            from vitavla.rollout.parallel import release_pool

            pool, self.pool = self.pool, None
            release_pool(pool, broken=broken)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close_pool()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.close_pool(broken=True)

    # -- test end: one collective, then log and (rank 0) write results.json ---------------------------
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self.metrics.compute().cpu()  # all-reduce across processes (every rank calls it)
        self.metrics.reset()
        results = self.summary(counts)
        if results["success_rate"] is not None:
            pl_module.log("test/success_rate", results["success_rate"], batch_size=1, on_epoch=True,
                          sync_dist=True)
        for t, task in results["per_task"].items():
            if task["success_rate"] is not None:
                pl_module.log(f"test/success_task{t}", task["success_rate"], batch_size=1, on_epoch=True,
                              sync_dist=True)
        pl_module.log("test/errors", float(results["errors"]), batch_size=1, on_epoch=True, sync_dist=True)
        trainer.strategy.barrier("rollout_results")  # every rank's records are on disk before rank 0 reads
        if trainer.is_global_zero:
            self.write(trainer, results)
        self.check_evaluated(results["episodes"], results["errors"], "episodes")

    def check_evaluated(self, evaluated: int, errors: int, unit: str) -> None:
        """On every rank (the counts are the synced ones), after the results are written: a run whose every
        episode ended in an error evaluated nothing and must not exit 0 as if it had; a script that reads
        the exit code would otherwise take "success n/a" for a result."""
        if errors and not evaluated:
            raise UserFacingError(f"all {errors} {unit} ended in an error, so nothing was evaluated; the errors "
                                  f"are in {self.out_dir / 'results.json'} (error_details), and a rerun retries "
                                  f"those {unit}")

    def summary(self, counts: torch.Tensor) -> dict:
        return summary_from_counts(counts, self.names)

    def write(self, trainer: Trainer, results: dict) -> None:
        dm = trainer.datamodule
        merged: dict[tuple, list[dict]] = {}
        for path in sorted(self.out_dir.glob("episodes.rank*.jsonl")):
            for r in read_records(path):
                merged.setdefault(record_key(r), []).append(r)
        finals = [final_record(merged[s.key]) for s in dm.specs() if s.key in merged]
        with open(self.out_dir / "episodes.jsonl", "w") as f:  # one deduplicated file for reports
            f.writelines(json.dumps(r) + "\n" for r in finals)
        results = {**results, "env": type(self.env).__name__, "protocol": getattr(self.env, "protocol", None),
                   "executor": dm.executor, "ckpt_path": trainer.ckpt_path, "world_size": trainer.world_size,
                   "error_details": [{k: r[k] for k in ("task", "episode", "seed", "error")}
                                     for r in finals if r["error"] is not None],
                   "seconds_sim": sum(r["seconds_sim"] for r in finals),
                   "seconds_policy": sum(r["seconds_policy"] for r in finals)}
        # report.py draws success_per_task.png; the results.json it also writes is replaced just below by
        # this one (same numbers from the same final records, plus the torchmetrics cross-process totals).
        report.write_report({k: v for k, v in results.items() if k not in KINDS}, self.out_dir / "episodes.jsonl",
                            self.out_dir)
        if isinstance(trainer.logger, TensorBoardLogger):
            report.log_to_tensorboard(trainer.logger, results, step=0)
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        rate = results["success_rate"]
        shown = "n/a" if rate is None else f"{rate:.3f}"
        rank_zero_info(f"rollout: success {shown} over {results['episodes']} episodes"
                       f" ({results['errors']} errors); results in {self.out_dir}")


def _callback(trainer: Trainer) -> RolloutTestCallback:
    for cb in trainer.callbacks:
        if isinstance(cb, RolloutTestCallback):
            return cb
    raise RuntimeError("a batch of EpisodeSpec reached test_step but the trainer has no RolloutTestCallback; "
                       "use data: vitavla.rollout.datamodule.RolloutDataModule (it attaches one in setup('test'))")


def rollout_test_step(module: LightningModule, batch: list[EpisodeSpec]) -> None:
    """Run (or, on resume, look up) each spec's episode and count its final record on this rank."""
    cb = _callback(module.trainer)
    for rec in cb.run_batch(batch):
        cb.metrics.update(rec)
        if rec["error"] is None:
            cb.ran += 1
            cb.wins += int(rec["success"])
    if cb.ran:
        # This rank's running rate, for the progress bar only: no sync (a collective per step would make
        # fast ranks wait) and not sent to the logger (the synced value is logged at epoch end).
        module.log("success", cb.wins / cb.ran, prog_bar=True, logger=False, on_step=True, on_epoch=False,
                   batch_size=1)
