"""DeepSpeed ZeRO on machines without CUDA, so the same YAML runs on a laptop, in CI and on a GPU node.

Lightning 2.6 hard-codes CUDA in :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`: an accelerator
check in ``setup_environment``, a device-index check in ``setup_distributed``, and ``root_device.index``
(``None`` on CPU) passed to ``deepspeed.initialize``. :class:`CPUDeepSpeedStrategy` replaces exactly those
three spots and leaves everything else (ZeRO config, precision, checkpointing) to Lightning.

DeepSpeed is an optional extra: this module imports it only when a strategy is constructed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info

# Lightning's names for DeepSpeed presets -> (ZeRO stage, whether the preset offloads to host memory).
DEEPSPEED_PRESETS: dict[str, tuple[int, bool]] = {
    "deepspeed": (2, False),
    "deepspeed_stage_1": (1, False),
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_2_offload": (2, True),
    "deepspeed_stage_3_offload": (3, True),
}


def _import_deepspeed():
    """Import deepspeed on the CPU accelerator, or fail with the install command."""
    # DeepSpeed picks its accelerator once, at first import; without this it probes for GPUs and logs a
    # warning before falling back to CPU. An explicit user setting wins.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        raise ImportError(
            "CPUDeepSpeedStrategy needs DeepSpeed, which is an optional extra of vitavla. "
            "Install it with `pip install 'vitavla[deepspeed]'` (or `pip install deepspeed`)."
        ) from err
    name = get_accelerator().device_name()
    if name != "cpu":
        raise RuntimeError(
            f"CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator, but deepspeed was already set up for "
            f"{name!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}). Set DS_ACCELERATOR=cpu before "
            "anything imports deepspeed, or use the regular DeepSpeedStrategy on a CUDA machine."
        )
    return deepspeed


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """:class:`~lightning.pytorch.strategies.DeepSpeedStrategy` that runs on ``accelerator="cpu"``.

    Takes the same arguments as Lightning's DeepSpeed strategy (``stage``, ``config``, ...). Processes talk
    over ``gloo``. The first run on a machine JIT-compiles DeepSpeed's shared-memory communication op
    (~50 s with g++/ninja), cached afterwards under ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _import_deepspeed()
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA-only accelerator check; DDP's setup (device + process group) is what
        # DeepSpeed needs on CPU as well.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # Lightning validates CUDA device indices here; CPU devices have none, so the check can only fail.
        _clear_stale_build_lock()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        deepspeed = _import_deepspeed()
        params = filter(lambda p: p.requires_grad, model.parameters())
        # device_rank is compared with ints: a CPU device's ``index`` is None, the local rank is not.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


_STALE_LOCK_SECONDS = 600


def _clear_stale_build_lock() -> None:
    """Remove the JIT-build lock of DeepSpeed's shm op when a killed build left it behind.

    torch's extension builder waits forever on that lock; the build itself takes about a minute, so a lock
    older than ten minutes belongs to a process that no longer exists.
    """
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    if lock.is_file() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        rank_zero_info(f"removing a stale DeepSpeed build lock left by an interrupted build: {lock}")
        lock.unlink(missing_ok=True)


def _register() -> None:
    """Make ``strategy: deepspeed_cpu_stage_N`` usable by name in YAML once this module is imported."""
    for stage in (1, 2, 3):
        name = f"deepspeed_cpu_stage_{stage}"
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, CPUDeepSpeedStrategy,
                                      description=f"DeepSpeed ZeRO stage {stage} on CPU (gloo)", stage=stage)


_register()


def resolve_strategy(strategy: Any, accelerator: Any = "auto") -> Any:
    """Swap Lightning's DeepSpeed preset names for :class:`CPUDeepSpeedStrategy` where training runs on CPU.

    ``strategy`` is what the trainer config holds (a name, a Strategy instance, ...); anything that is not a
    DeepSpeed preset name is returned unchanged, as is every preset when the run will use CUDA. The run is on
    CPU when ``accelerator`` is ``"cpu"``, or ``"auto"``/None and CUDA is unavailable. An explicit
    ``"gpu"``/``"cuda"`` accelerator is left for Lightning to reject with its own message.
    """
    if not isinstance(strategy, str) or strategy not in DEEPSPEED_PRESETS:
        return strategy
    acc = accelerator if isinstance(accelerator, str) or accelerator is None else type(accelerator).__name__
    acc = (acc or "auto").lower()
    on_cpu = acc in ("cpu", "cpuaccelerator") or (acc == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return strategy
    stage, offload = DEEPSPEED_PRESETS[strategy]
    if offload:
        # Offloading moves optimizer state and parameters to host memory, where a CPU run keeps them anyway.
        rank_zero_info(f"strategy={strategy!r} on CPU: using ZeRO stage {stage} without offload "
                       "(everything already lives in host memory).")
    return CPUDeepSpeedStrategy(stage=stage)


__all__ = ["CPUDeepSpeedStrategy", "resolve_strategy"]
