"""Simulator-free closed-loop evaluation: executors, the env adapter contract, the resumable runner,
and CALVIN's long-horizon protocol. Benchmark adapters (LIBERO, CALVIN, ALOHA) plug into these.

Members import on first use (:mod:`vitavla.lazy`): a simulator worker that unpickles ``LiberoEnv`` then
loads only ``vitavla.rollout.env`` and the adapter, not the runner's torchmetrics/Lightning stack.
"""

from vitavla.lazy import lazy_exports

_MODULES = {
    "vitavla.rollout.calvin_protocol": ["Chain", "ChainResult", "average_length", "calvin_oracle",
                                        "count_success", "load_chains", "run_chain"],
    "vitavla.rollout.env": ["Obs", "RolloutEnv", "ScriptedStandInEnv"],
    "vitavla.rollout.executors": ["ActionExecutor", "ChunkExecutor", "FirstActionExecutor",
                                  "TemporalEnsembleExecutor", "to_env_action"],
    "vitavla.rollout.runner": ["Controller", "EpisodeResult", "EpisodeSpec", "evaluate", "load_results",
                               "run_episode", "shard", "summarize"],
    "vitavla.rollout.stats": ["wilson_interval"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
