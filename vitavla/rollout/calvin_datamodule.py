"""CALVIN long-horizon evaluation as a test set: one batch = one chain (an :class:`EpisodeSpec` with task 0 and
episode = chain index), run by :class:`vitavla.rollout.calvin_lightning.CalvinRolloutTestCallback`.

``vitavla test --config configs/eval_calvin.yaml --ckpt_path RUN.ckpt``

In the rollout layer beside :mod:`vitavla.rollout.datamodule` (see there why); the old class_path
``datamodules.calvin_rollout.CalvinRolloutDataModule`` still resolves to it, lazily.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from vitavla.batch import RobotSpec
from vitavla.layouts import CALVIN_ROBOT as ROBOT
from vitavla.rollout.calvin_env import CalvinSimEnv, check_state_resolver, load_calvin_chains
from vitavla.rollout.calvin_lightning import CalvinRolloutTestCallback
from vitavla.rollout.calvin_protocol import EP_LEN, check_subtasks
from vitavla.rollout.datamodule import ExecutorName, collate_specs
from vitavla.rollout.episode import EpisodeSpec
from vitavla.rollout.executors import ActionExecutor, build_executor


class CalvinRolloutDataModule(LightningDataModule):
    """The chains of CALVIN's long-horizon benchmark for ``vitavla test``."""

    image_size = None  # images come from the simulator and are resized to the student's size

    def __init__(self, env: CalvinSimEnv, chains: str | None = None, num_chains: int | None = 1000,
                 ep_len: int = EP_LEN, executor: ExecutorName = "first", ensemble_k: float = 0.01,
                 chunk_steps: int | None = None, out_dir: str = "runs/eval_calvin/rollout", seed: int = 0,
                 retries: int = 1, allow_missing_normalizer: bool = False, num_envs: int = 1,
                 env_timeout: float | None = None, record_videos: int = 2):
        """
        Args:
            env: the simulator adapter with its task oracle and instructions, by class_path
                (``vitavla.rollout.calvin_env.CalvinSimEnv``).
            chains: JSON file of ``[initial_state, [5 subtasks]]`` (the official ``eval_sequences.json``, or one
                written by ``python -m vitavla.rollout.calvin_env export-chains``); None generates the official
                1000 chains with calvin_models' ``get_sequences(1000)``.
            num_chains: chains evaluated: the first ``num_chains`` of the file or of the official 1000 (None:
                all); CALVIN reports 1000, and a smaller number is always a prefix of those.
            ep_len: policy steps allowed per subtask (CALVIN: 360).
            executor: ``first`` (query every step, run its first action: Seer on CALVIN), ``chunk`` or
                ``ensemble`` (temporal ensembling with ``ensemble_k``).
            ensemble_k: temporal-ensembling decay ``exp(-k i)``.
            chunk_steps: actions of each chunk run open-loop by ``chunk`` (default: the whole chunk).
            out_dir: where ``episodes.rank*.jsonl`` (one line per chain attempt; resumable),
                ``episodes.jsonl`` and ``results.json`` go.
            seed: torch/numpy seed set before every chain.
            retries: re-runs of a chain whose simulator crashed; a crashed chain is reported, never counted.
            allow_missing_normalizer: accept a checkpoint without an action normalizer (only for envs that take
                normalized actions; CalvinSimEnv takes CALVIN's raw rel_actions).
            num_envs: simulators run in parallel per process, each in its own worker process, with one batched
                policy call per control step. ``num_envs`` chains start together and advance in subtask waves
                (a chain that finishes a subtask early waits for the others); the next chains start when all
                of them ended. Records equal those of ``num_envs: 1``.
            env_timeout: with ``num_envs > 1``, seconds one reset or step may take before the simulator
                process counts as hung: it is restarted and the chain recorded as crashed (null: no limit).
            record_videos: the first ``record_videos`` chains are saved as annotated videos
                (``videos/chainNNNN_Kof5.mp4``, every subtask's instruction and outcome on the frames).
        """
        super().__init__()
        if executor not in ("first", "chunk", "ensemble"):
            raise ValueError(f"executor must be 'first', 'chunk' or 'ensemble', got {executor!r}")
        if ep_len < 1:
            raise ValueError(f"ep_len must be >= 1, got {ep_len}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if env_timeout is not None and env_timeout <= 0:
            raise ValueError(f"env_timeout must be positive seconds or null, got {env_timeout!r}")
        if not isinstance(record_videos, int) or record_videos < 0:
            raise ValueError(f"record_videos must be an integer >= 0, got {record_videos!r}")
        for attr in ("oracle", "instructions", "num_tasks", "task_name", "action_dim"):
            if not hasattr(env, attr):
                raise TypeError(f"env {type(env).__name__} has no {attr!r}; use vitavla.rollout.calvin_env."
                                "CalvinSimEnv or an env with its interface")
        self.env = env
        self.chains = load_calvin_chains(chains, num_chains)
        source = str(chains) if chains else "the official chains"
        check_subtasks(self.chains, env.instructions, getattr(env, "known_subtasks", None), source=source)
        # Symbolic states need calvin_models: fail now, not once per chain.
        check_state_resolver(self.chains, source)
        self.oracle, self.instructions = env.oracle, env.instructions
        self.ep_len, self.executor, self.ensemble_k, self.chunk_steps = int(ep_len), executor, ensemble_k, chunk_steps
        self.out_dir, self.seed, self.retries = out_dir, seed, retries
        self.allow_missing_normalizer = allow_missing_normalizer
        self.settle_steps = 0  # a chain starts from its initial state as calvin_env resets it: no settling
        self.record_videos_per_task = record_videos  # one task whose episodes are chains: the first N chains
        self.num_envs, self.env_timeout = num_envs, env_timeout
        self.make_executor()  # fail at config time on bad executor settings

    @property
    def robot(self) -> RobotSpec:
        """CALVIN's robot (6 + 1, binary gripper state): the model is checked against it before testing."""
        return ROBOT

    def specs(self) -> list[EpisodeSpec]:
        """One spec per chain, in chain order."""
        return [EpisodeSpec(0, i, self.seed) for i in range(len(self.chains))]

    def make_executor(self) -> ActionExecutor:
        """A fresh executor (run_chain resets it per subtask)."""
        return build_executor(self.executor, self.ensemble_k, self.chunk_steps)

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise ValueError(f"CalvinRolloutDataModule only serves `vitavla test`, not {stage!r}")
        trainer = self.trainer
        if trainer is None:
            return
        if len(self.chains) < trainer.world_size:
            # A process without chains skips the test loop and would never join the metric's all-reduce.
            raise ValueError(f"{len(self.chains)} chains for {trainer.world_size} processes: every process needs one")
        if not any(isinstance(cb, CalvinRolloutTestCallback) for cb in trainer.callbacks):
            trainer.callbacks.append(CalvinRolloutTestCallback())

    def test_dataloader(self) -> DataLoader:
        """Chains of this process, ``num_envs`` per batch (run concurrently); with several processes each chain
        goes to exactly one (an unrepeated sampler: a padding one would run and count a chain twice)."""
        specs = self.specs()
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(specs, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(specs, batch_size=self.num_envs, sampler=sampler, shuffle=False, collate_fn=collate_specs)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # host-side specs; observations go to the policy's device in the rollout loop
