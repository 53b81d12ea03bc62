"""One tiny stage-2 checkpoint with a normalizer, exported once per session; serving tests share it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.normalization import Normalizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EVAL_TINY = CONFIGS / "eval_tiny.yaml"
# Robot units deliberately far from the normalized range, so un-normalization is visible in every value.
NORMALIZER = Normalizer(arm_low=[-0.5, -1.0, -2.0, 0.0, 10.0, -3.0], arm_high=[0.5, 1.0, 2.0, 4.0, 20.0, 3.0],
                        gripper_low=[-1.0], gripper_high=[1.0], state_mean=[0.1] * 7, state_std=[2.0] * 7)


TINY_ALIGN = CONFIGS / "tiny_align.yaml"


def trained_module(config: Path = EVAL_TINY, normalizer: Normalizer = NORMALIZER):
    """The model of ``config`` (seeded, so every process builds the same one) with its trainable weights
    moved off their initial values, as training would, and ``normalizer`` as the data's."""
    from cli import build_cli

    module = build_cli(["--config", str(config), "--trainer.logger=false"], run=False).model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    module.normalizer_state = normalizer.state_dict()
    return module


def make_checkpoint(path: Path, normalizer: Normalizer = NORMALIZER, config: Path = EVAL_TINY):
    """A checkpoint as `vitavla fit` writes it (trainable weights + normalizer) of ``config``'s model (default
    eval_tiny's stage 2), from :func:`trained_module`; returns (path, the module)."""
    module = trained_module(config, normalizer)
    import lightning

    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path, module


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(policy dir, checkpoint path, the source module) of the tiny stage-2 policy."""
    from vitavla.serving.export import export_from_config

    root = tmp_path_factory.mktemp("tiny_export")
    ckpt, module = make_checkpoint(root / "last.ckpt")
    out = export_from_config([str(EVAL_TINY)], ckpt, root / "policy")
    return out, ckpt, module


def observations(n: int, size: int = 48, seed: int = 0) -> list[dict]:
    """``n`` openpi-style observations (LIBERO keys) of one episode, with random frames and states."""
    rng = np.random.default_rng(seed)
    return [{"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "observation/state": rng.normal(size=7).astype(np.float32),
             "prompt": "pick up the red block"} for _ in range(n)]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Servers started here set torch's (process-wide) thread count; later tests get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
