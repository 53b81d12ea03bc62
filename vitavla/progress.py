"""The training progress bar: Lightning's rich bar with a description that reads right for step-bounded runs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's :class:`RichProgressBar`, except for the bar's label.

    Lightning labels it ``Epoch e/(max_epochs - 1)``, which reads ``Epoch 2/-2`` for a run bounded by
    ``max_steps`` alone (``max_epochs = -1``, as in every quickstart config). This bar says ``Epoch e`` then,
    followed by the step budget, and keeps Lightning's label when an epoch bound is set.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" (max {trainer.max_steps} steps)"
        # Padded like Lightning's, so the label does not flicker against the validation bar's.
        return f"{text:{len(self.validation_description)}}"
