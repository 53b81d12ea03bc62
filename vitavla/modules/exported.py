"""A policy directory written by ``vitavla export`` as a LightningModule, for ``vitavla test``.

``vitavla test --config configs/eval_*.yaml --ckpt_path DIR`` swaps the config's model section for this
module (see ``cli._use_policy_dir``): the evaluated weights, frozen towers included, and the normalizer come
from DIR, the env and executor from the config. It only evaluates; it has nothing to train.
"""

from __future__ import annotations

import lightning as L

from vitavla.rollout.lightning import is_rollout_batch, rollout_test_step
from vitavla.serving.export import load_policy_dir
from vitavla.streaming import StreamingPolicy


class ExportedPolicyModule(L.LightningModule):
    """Closed-loop evaluation of an exported policy directory (``vitavla export``)."""

    def __init__(self, path: str):
        """
        Args:
            path: the directory ``vitavla export`` wrote (holds policy.json and model.safetensors).
        """
        super().__init__()
        exported = load_policy_dir(path)
        self.path = str(path)
        self.policy = exported.policy
        self.history_length = exported.history_length
        self.normalizer_state = exported.spec.get("normalizer")

    def rollout_policy(self) -> StreamingPolicy:
        """The exported policy streamed with the history length it was exported with."""
        return StreamingPolicy(self.policy, max_steps=self.history_length)

    def test_step(self, batch, batch_idx: int):
        if not is_rollout_batch(batch):
            raise TypeError(f"ExportedPolicyModule ({self.path}) evaluates closed-loop rollouts only: use "
                            "data: vitavla.rollout.datamodule.RolloutDataModule (an eval_*.yaml config)")
        return rollout_test_step(self, batch)
