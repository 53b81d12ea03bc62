"""Closed-loop evaluation as a test set: one batch = a list of :class:`EpisodeSpec` to roll out.

It lives in the rollout layer, not in ``datamodules/`` (the training-data readers, below the rollouts): it
takes a :class:`RolloutEnv` and attaches the :class:`RolloutTestCallback` that runs the episodes. The old
class_path ``datamodules.RolloutDataModule`` still resolves to it, lazily.

``vitavla test --config configs/eval_libero.yaml --ckpt_path RUN.ckpt`` runs every episode of the suite
through Lightning's test loop; :mod:`vitavla.rollout.lightning` does the rollouts, resuming and metrics.
Episodes are sharded across processes by an unrepeated distributed sampler (see :meth:`dataloader`).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from vitavla.errors import writable_dir
from vitavla.rollout.env import RolloutEnv
from vitavla.rollout.episode import EpisodeSpec
from vitavla.rollout.executors import ActionExecutor, build_executor
from vitavla.rollout.lightning import RolloutTestCallback

ExecutorName = Literal["first", "chunk", "ensemble"]


def collate_specs(specs: list[EpisodeSpec]) -> list[EpisodeSpec]:
    """A batch of specs stays a list: the rollout callback runs them, nothing is stacked."""
    return list(specs)


class RolloutDataModule(LightningDataModule):
    """Episodes of a :class:`RolloutEnv` for ``vitavla test``; settings of the closed-loop protocol."""

    image_size = None  # images come from the env and are resized to the student's size: nothing to check

    def __init__(self, env: RolloutEnv, episodes_per_task: int | None = None, tasks: list[int] | None = None,
                 executor: ExecutorName = "first", ensemble_k: float = 0.01, chunk_steps: int | None = None,
                 out_dir: str = "runs/eval", record_videos_per_task: int = 2, seed: int = 0,
                 settle_steps: int = 0, retries: int = 1, allow_missing_normalizer: bool = False,
                 num_envs: int = 1, env_timeout: float | None = None, first_episode: int = 0):
        """
        Args:
            env: the simulator adapter, by class_path (e.g. ``vitavla.rollout.libero_env.LiberoEnv``).
            episodes_per_task: episodes per task (default: the env's ``trials_per_task``, else 10).
            first_episode: index of each task's first episode (LIBERO: its fixed init state), e.g. to
                evaluate on init states that training demonstrations never started from.
            tasks: task indices to evaluate (default: all of the env's tasks).
            executor: ``first`` (query every step, run its first action), ``chunk`` (run chunks open-loop)
                or ``ensemble`` (Seer's temporal ensembling).
            ensemble_k: temporal-ensembling decay ``exp(-k i)`` (Seer: 0.01).
            chunk_steps: actions of each chunk run open-loop by ``chunk`` (default: the whole chunk).
            out_dir: where ``episodes.rank*.jsonl`` (resumable), ``episodes.jsonl`` and ``results.json`` go.
            record_videos_per_task: episodes per task recorded as videos (needs ``vitavla.rollout.report``).
            seed: seed of every episode (env reset and torch/numpy before the episode).
            settle_steps: no-op actions the runner sends after reset; keep 0 for an env that settles inside
                ``reset`` (LiberoEnv does, with its own ``settle_steps``).
            retries: re-runs of an episode whose simulator crashed; crashes never count as failures.
            allow_missing_normalizer: accept a checkpoint without an action normalizer and send normalized
                actions (arm [-1, 1], gripper 0/1) to the env; only for envs that take them (the stand-in).
            num_envs: simulators run in parallel per process, each in its own worker process, with one
                batched policy call per control step (1: episodes one by one in this process). Up to
                ``num_envs`` episodes start together and the next ones start when all of them ended; results,
                resume and retries are the same as with 1. The env must pickle (its simulator is created on
                first reset, in the worker). Good values: up to the CPU cores per process.
            env_timeout: with ``num_envs > 1``, seconds one reset or step may take before the simulator
                counts as hung: its worker is killed and restarted and the episode recorded as a crash
                (default: no limit; a worker that dies is always detected).
        """
        super().__init__()
        if executor not in ("first", "chunk", "ensemble"):
            raise ValueError(f"executor must be 'first', 'chunk' or 'ensemble', got {executor!r}")
        self.env = env
        per_task = episodes_per_task if episodes_per_task is not None else getattr(env, "trials_per_task", 10)
        if per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {per_task}")
        self.episodes_per_task = int(per_task)
        self.tasks = list(range(env.num_tasks)) if tasks is None else [int(t) for t in tasks]
        bad = [t for t in self.tasks if not 0 <= t < env.num_tasks]
        if bad or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct indices in [0, {env.num_tasks}), got {self.tasks}")
        self.executor, self.ensemble_k, self.chunk_steps = executor, ensemble_k, chunk_steps
        self.out_dir = out_dir
        self.record_videos_per_task = record_videos_per_task
        self.seed, self.settle_steps, self.retries = seed, settle_steps, retries
        self.allow_missing_normalizer = allow_missing_normalizer
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if env_timeout is not None and env_timeout <= 0:
            raise ValueError(f"env_timeout must be positive seconds or null, got {env_timeout!r}")
        self.num_envs, self.env_timeout = num_envs, env_timeout
        if not isinstance(first_episode, int) or first_episode < 0:
            raise ValueError(f"first_episode must be an integer >= 0, got {first_episode!r}")
        self.first_episode = first_episode
        self.make_executor()  # fail at config time on bad executor settings, not after the first episode

    def specs(self) -> list[EpisodeSpec]:
        """Every episode of the evaluation, task-major (the order of results files and reports)."""
        episodes = range(self.first_episode, self.first_episode + self.episodes_per_task)
        return [EpisodeSpec(t, e, self.seed) for t in self.tasks for e in episodes]

    def make_executor(self) -> ActionExecutor:
        """A fresh executor (one per episode; executors keep per-episode buffers)."""
        return build_executor(self.executor, self.ensemble_k, self.chunk_steps)

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise ValueError(f"RolloutDataModule only serves `vitavla test`, not {stage!r}")
        trainer = self.trainer
        if trainer is None:
            return
        n = len(self.specs())
        if n < trainer.world_size:
            # A process without episodes skips the test loop and would never join the metrics' all-reduce.
            raise ValueError(f"{n} episodes for {trainer.world_size} processes: every process needs one")
        # Before the checkpoint is loaded and any episode runs, not at the first record.
        writable_dir(self.out_dir, "data.init_args.out_dir")
        if not any(isinstance(cb, RolloutTestCallback) for cb in trainer.callbacks):
            trainer.callbacks.append(RolloutTestCallback())

    def dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """Specs of one process, ``num_envs`` per batch (run concurrently). With several processes each spec goes to exactly one of
        them (round robin). Lightning's default DistributedSampler would pad the shards to equal length by
        repeating specs, running and counting those episodes twice; being a DistributedSampler subclass,
        this sampler is kept by Lightning as is."""
        specs = self.specs()
        sampler = None
        if num_replicas > 1:
            sampler = UnrepeatedDistributedSampler(specs, num_replicas=num_replicas, rank=rank, shuffle=False)
        return DataLoader(specs, batch_size=self.num_envs, sampler=sampler, shuffle=False, collate_fn=collate_specs)

    def test_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None:
            return self.dataloader()
        return self.dataloader(trainer.world_size, trainer.global_rank)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # Specs are host-side descriptions (frozen dataclasses, which Lightning's default transfer rejects);
        # the episode loop moves each observation to the policy's device itself.
        return batch
