import math

import numpy as np
import pytest
import torch

from datamodules.normalization import Normalizer
from teachers.base import ActionOutput
from vitavla.rollout.executors import (ChunkExecutor, FirstActionExecutor, TemporalEnsembleExecutor,
                                       to_env_action)


def chunk(arm, prob):
    """ActionOutput from nested lists: arm (B, C, a), gripper probabilities (B, C, g)."""
    p = torch.tensor(prob, dtype=torch.float64)
    return ActionOutput(torch.tensor(arm, dtype=torch.float32), torch.logit(p).float())


def test_first_action_executes_entry_zero_with_binary_gripper():
    ex = FirstActionExecutor()
    assert ex.needs_query(0) and ex.needs_query(1)
    ex.update(0, chunk([[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]], [[[0.7], [0.1], [0.1]]]))
    assert torch.allclose(ex.act(0), torch.tensor([[0.1, 0.2, 1.0]]))
    ex.update(1, chunk([[[-0.5, 0.0], [0.3, 0.4], [0.5, 0.6]]], [[[0.5], [0.9], [0.9]]]))
    assert torch.allclose(ex.act(1), torch.tensor([[-0.5, 0.0, 0.0]]))  # 0.5 is not > 0.5


def test_continuous_gripper_keeps_the_probability():
    ex = FirstActionExecutor(gripper_mode="continuous")
    ex.update(0, chunk([[[0.1], [0.2], [0.3]]], [[[0.3], [0.9], [0.9]]]))
    assert torch.allclose(ex.act(0), torch.tensor([[0.1, 0.3]]), atol=1e-6)
    with pytest.raises(ValueError):
        FirstActionExecutor(gripper_mode="round")


def test_chunk_executor_query_schedule_and_entries():
    ex = ChunkExecutor()
    arm = [[[0.1], [0.2], [0.3]]]
    queried = []
    for t in range(7):
        if ex.needs_query(t):
            queried.append(t)
            ex.update(t, chunk([[[a[0] + t] for a in arm[0]]], [[[0.9], [0.2], [0.9]]]))
        got = ex.act(t)
        start = queried[-1]
        assert torch.allclose(got[0, 0], torch.tensor(start + [0.1, 0.2, 0.3][t - start]))
        assert got[0, 1] == [1.0, 0.0, 1.0][t - start]
    assert queried == [0, 3, 6]


def test_chunk_executor_partial_execution_like_openpi():
    ex = ChunkExecutor(steps=2)
    out = chunk([[[0.1], [0.2], [0.3]]], [[[0.9], [0.9], [0.9]]])
    schedule = []
    for t in range(6):
        if ex.needs_query(t):
            schedule.append(t)
            ex.update(t, out)
        ex.act(t)
    assert schedule == [0, 2, 4]
    with pytest.raises(ValueError):
        ChunkExecutor(steps=4).update(0, out)


def test_temporal_ensemble_weights_oldest_first():
    ex = TemporalEnsembleExecutor(k=0.01)
    w = ex.weights(3)
    e = [1.0, math.exp(-0.01), math.exp(-0.02)]
    assert torch.allclose(w, torch.tensor([v / sum(e) for v in e]))
    assert w[0] > w[1] > w[2]  # the oldest prediction weighs most


def test_temporal_ensemble_hand_computed_values():
    k = 1.0  # a large k makes the oldest-first order visible in the numbers
    ex = TemporalEnsembleExecutor(k=k)
    # Chunk predicted at step s: arm values 10*s + j for future step s + j.
    probs = {0: [0.9, 0.9, 0.9], 1: [0.1, 0.3, 0.1], 2: [0.4, 0.1, 0.1]}
    outs = {s: chunk([[[10.0 * s + j] for j in range(3)]], [[[p] for p in probs[s]]]) for s in range(3)}

    ex.update(0, outs[0])
    a0 = ex.act(0)
    assert torch.allclose(a0, torch.tensor([[0.0, 1.0]]))

    ex.update(1, outs[1])
    w = [1.0, math.exp(-k)]
    w = [v / sum(w) for v in w]
    # predictions for step 1, oldest first: chunk 0 entry 1 (arm 1, p 0.9), chunk 1 entry 0 (arm 10, p 0.1)
    arm1 = w[0] * 1.0 + w[1] * 10.0
    p1 = w[0] * 0.9 + w[1] * 0.1
    assert torch.allclose(ex.act(1), torch.tensor([[arm1, float(p1 > 0.5)]]), atol=1e-5)

    ex.update(2, outs[2])
    w = [1.0, math.exp(-k), math.exp(-2 * k)]
    w = [v / sum(w) for v in w]
    arm2 = w[0] * 2.0 + w[1] * 11.0 + w[2] * 20.0
    assert torch.allclose(ex.act(2)[0, 0], torch.tensor(arm2), atol=1e-5)


def test_temporal_ensemble_thresholds_after_averaging():
    ex = TemporalEnsembleExecutor(k=0.01)
    # Step 2 collects probabilities 0.9, 0.3, 0.4: mean ~0.533 -> close (1). Thresholding each first
    # and averaging would give 1/3 -> 0.
    for s, p in enumerate([[0.1, 0.1, 0.9], [0.1, 0.3, 0.1], [0.4, 0.1, 0.1]]):
        ex.update(s, chunk([[[0.0], [0.0], [0.0]]], [[[v] for v in p]]))
        got = ex.act(s)
    assert got[0, 1] == 1.0
    cont = TemporalEnsembleExecutor(k=0.01, gripper_mode="continuous")
    for s, p in enumerate([[0.1, 0.1, 0.9], [0.1, 0.3, 0.1], [0.4, 0.1, 0.1]]):
        cont.update(s, chunk([[[0.0], [0.0], [0.0]]], [[[v] for v in p]]))
        got = cont.act(s)
    e = [1.0, math.exp(-0.01), math.exp(-0.02)]
    assert got[0, 1].item() == pytest.approx((0.9 * e[0] + 0.3 * e[1] + 0.4 * e[2]) / sum(e), abs=1e-6)


def test_temporal_ensemble_keeps_at_most_chunk_predictions():
    ex = TemporalEnsembleExecutor()
    out = chunk([[[0.0], [0.0], [0.0]]], [[[0.5], [0.5], [0.5]]])
    for t in range(10):
        ex.update(t, out)
        ex.act(t)
        assert len(ex._buffer[t]) == min(t + 1, 3)
        assert min(ex._buffer) == t  # executed steps are dropped


@pytest.mark.parametrize("make", [FirstActionExecutor, ChunkExecutor, TemporalEnsembleExecutor])
def test_reset_clears_state(make):
    ex = make()
    ex.update(0, chunk([[[0.5], [0.5], [0.5]]], [[[0.9], [0.9], [0.9]]]))
    ex.act(0)
    ex.reset()
    assert ex.needs_query(0)
    with pytest.raises(RuntimeError):
        ex.act(0)


@pytest.mark.parametrize("make", [FirstActionExecutor, ChunkExecutor, TemporalEnsembleExecutor])
def test_batch_entries_are_independent(make):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 6, generator=gen) * 2 - 1
    g = torch.randn(2, 3, 1, generator=gen)
    solo, pair = make(), make()
    for t in range(5):
        changed = ActionOutput(torch.cat([a[:1] + 0.01 * t, -a[1:]]), torch.cat([g[:1], g[1:] + 5]))
        if pair.needs_query(t):
            pair.update(t, changed)
        if solo.needs_query(t):
            solo.update(t, ActionOutput(changed.arm[:1], changed.gripper_logit[:1]))
        assert torch.equal(pair.act(t)[:1], solo.act(t))


def test_to_env_action_unnormalizes_binary_gripper_to_plus_minus_one():
    norm = Normalizer([-0.5, 0.0], [0.5, 2.0], [-1.0], [1.0])  # LIBERO-style gripper -1 open / +1 close
    raw = to_env_action(torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 0.0]]), norm)
    assert raw.dtype == np.float32
    np.testing.assert_allclose(raw, [[0.5, 0.0, 1.0], [0.0, 1.0, -1.0]])
    np.testing.assert_allclose(to_env_action(torch.tensor([[0.2, 1.0]])), [[0.2, 1.0]])
    with pytest.raises(ValueError):
        to_env_action(torch.zeros(1, 2), norm)
