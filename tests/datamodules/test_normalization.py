import json

import numpy as np
import pytest
import torch

from datamodules.normalization import Normalizer, cached_normalizer, dataset_fingerprint


def _actions(n=200, seed=0):
    rng = np.random.default_rng(seed)
    arm = rng.normal(size=(n, 6)) * [1, 2, 3, 0.1, 0.1, 5]
    arm[:, 4] = 0.25  # a dimension with zero range
    grip = rng.choice([-1.0, 1.0], size=(n, 1))
    return np.concatenate([arm, grip], 1)


@pytest.mark.parametrize("mode", ["minmax", "quantile"])
def test_round_trip_and_ranges(mode):
    a = _actions()
    norm = Normalizer.fit(a, arm_dim=6, mode=mode, gripper_range=(-1, 1))
    t = torch.from_numpy(a).float()
    n = norm.normalize_actions(t)
    assert n[:, :6].min() >= -1 and n[:, :6].max() <= 1 and set(n[:, 6].tolist()) <= {0.0, 1.0}
    assert torch.all(n[:, 4] == 0)  # zero-range dimension maps to 0 ...
    back = norm.unnormalize_actions(n)
    assert torch.allclose(back[:, 4], torch.tensor(0.25))  # ... and back to its constant
    inside = (n[:, :6].abs() < 1).all(1)  # quantile mode clips the tails
    assert torch.allclose(back[inside], t[inside], atol=1e-5)
    if mode == "minmax":
        assert torch.allclose(back, t, atol=1e-5)


def test_save_load_and_checkpoint_safe_state(tmp_path):
    norm = Normalizer.fit(_actions(), arm_dim=6, gripper_convention="1 = open")
    norm.save(tmp_path / "n.json")
    again = Normalizer.load(tmp_path / "n.json")
    assert again == norm
    torch.save({"normalizer": norm.state_dict()}, tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["normalizer"]  # plain lists: safe to load
    assert Normalizer.from_state_dict(state) == norm
    (tmp_path / "bad.json").write_text(json.dumps({"arm_low": [0]}))
    with pytest.raises(ValueError, match="bad.json: not a vitavla normalizer"):
        Normalizer.load(tmp_path / "bad.json")


def test_stats_are_computed_once_and_cached(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"x")
    calls = []

    def compute():
        calls.append(1)
        return Normalizer.fit(_actions(), arm_dim=6)

    fp = dataset_fingerprint([f])
    a = cached_normalizer(tmp_path / "cache", fp, compute)
    b = cached_normalizer(tmp_path / "cache", fp, compute)
    assert a == b and len(calls) == 1


def test_fit_rejects_nan():
    a = _actions()
    a[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Normalizer.fit(a, arm_dim=6)


def test_state_statistics_standardise_and_keep_raw_dims():
    rng = np.random.default_rng(1)
    states = np.concatenate([rng.normal([0.1, -0.2, 0.3], [0.05, 0.2, 0.01], size=(500, 3)),
                             rng.choice([0.0, 1.0], size=(500, 1))], axis=1)
    states[:, 2] = 0.3  # a constant dimension: its scale is floored, not divided by zero
    norm = Normalizer.fit(_actions(), arm_dim=6).with_state_stats(states, raw_dims=[3], min_std=1e-3)
    assert norm.normalizes_state and not Normalizer.fit(_actions(), arm_dim=6).normalizes_state
    out = norm.normalize_state(torch.from_numpy(states).float())
    torch.testing.assert_close(out[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert torch.all(out[:, 2] == 0)
    assert torch.equal(out[:, 3], torch.from_numpy(states[:, 3]).float())  # binary flags pass through
    # Raw states through a normalizer without state statistics are unchanged (old checkpoints).
    raw = torch.randn(2, 4)
    assert torch.equal(Normalizer.fit(_actions(), arm_dim=6).normalize_state(raw), raw)
    with pytest.raises(ValueError, match="4-D states"):
        norm.normalize_state(torch.zeros(2, 5))


def test_state_statistics_survive_the_checkpoint_round_trip(tmp_path):
    norm = Normalizer.fit(_actions(), arm_dim=6).with_state_stats(np.random.default_rng(0).normal(size=(50, 8)))
    torch.save({"normalizer": norm.state_dict()}, tmp_path / "c.ckpt")
    back = Normalizer.from_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["normalizer"])
    assert back == norm
    old = {k: v for k, v in norm.state_dict().items() if not k.startswith("state_")}  # written before the field
    assert not Normalizer.from_state_dict(old).normalizes_state
