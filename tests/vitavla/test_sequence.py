import torch

from vitavla.sequence import ACTION, IMAGE, STATE, TEXT, TokenMeta, allowed_attention, positions_from_real


def _meta(kinds, real=None):
    kind = torch.tensor([kinds])
    real = torch.ones_like(kind, dtype=torch.bool) if real is None else torch.tensor([real])
    return TokenMeta(kind, real, torch.arange(len(kinds))[None])


STEP = [IMAGE, IMAGE, TEXT, STATE, ACTION, ACTION, ACTION]


def test_action_tokens_are_invisible_to_every_other_token():
    meta = _meta(STEP * 2)
    ok = allowed_attention(meta, meta, "action_isolated")[0]
    action_cols = [i for i, k in enumerate(STEP * 2) if k == ACTION]
    for q in range(ok.shape[0]):
        for k in action_cols:
            assert ok[q, k] == (q == k)
    # step-1 action query (index 11) sees every observation token of steps 0 and 1
    obs = [i for i, k in enumerate(STEP * 2) if k != ACTION and i <= 11]
    assert ok[11, obs].all()
    # nothing attends to the future
    assert not torch.triu(ok, diagonal=1).any()


def test_causal_mode_is_plain_lower_triangular():
    meta = _meta(STEP * 2)
    ok = allowed_attention(meta, meta, "causal")[0]
    assert torch.equal(ok, torch.tril(torch.ones_like(ok)))


def test_padding_is_masked_as_key_and_skipped_by_positions():
    meta = _meta([TEXT, TEXT, TEXT, STATE], real=[True, False, False, True])
    ok = allowed_attention(meta, meta, "action_isolated")[0]
    assert not ok[3, 1] and not ok[3, 2] and ok[3, 0]
    assert ok[1, 1]  # a padded query keeps its own diagonal: no all-masked row
    assert positions_from_real(meta.real).tolist() == [[0, 0, 0, 1]]
