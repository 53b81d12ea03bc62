"""Simulator-free closed-loop evaluation: executors, the env adapter contract, the resumable runner,
and CALVIN's long-horizon protocol. Benchmark adapters (LIBERO, CALVIN, ALOHA) plug into these."""

from vitavla.rollout.calvin_protocol import (Chain, ChainResult, average_length, calvin_oracle, count_success,
                                             load_chains, run_chain)
from vitavla.rollout.env import Obs, RolloutEnv, ScriptedStandInEnv
from vitavla.rollout.executors import (ActionExecutor, ChunkExecutor, FirstActionExecutor,
                                       TemporalEnsembleExecutor, to_env_action)
from vitavla.rollout.runner import (Controller, EpisodeResult, EpisodeSpec, evaluate, load_results,
                                    run_episode, shard, summarize)

__all__ = ["ActionExecutor", "Chain", "ChainResult", "ChunkExecutor", "Controller", "EpisodeResult",
           "EpisodeSpec", "FirstActionExecutor", "Obs", "RolloutEnv", "ScriptedStandInEnv",
           "TemporalEnsembleExecutor", "average_length", "calvin_oracle", "count_success", "evaluate",
           "load_chains", "load_results", "run_chain", "run_episode", "shard", "summarize", "to_env_action"]
