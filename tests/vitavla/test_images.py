"""vitavla.images: the shared uint8 resize (values, shapes, a frame = its row of a stack), nearest upscaling."""

import numpy as np
import pytest
import torch

from vitavla.images import resize_uint8, upscale_nearest


def test_resize_shapes_and_identity_at_size():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    out = resize_uint8(stack, 20)
    assert out.shape == (3, 3, 20, 20) and out.dtype == torch.uint8
    assert torch.equal(out.permute(0, 2, 3, 1), torch.from_numpy(stack))  # no interpolation at the right size
    one = resize_uint8(stack[1], 12)
    assert one.shape == (3, 12, 12) and one.dtype == torch.uint8


@pytest.mark.parametrize("size", [7, 12, 33, 64])
def test_one_frame_equals_its_row_of_a_stack(size):
    # The rollout resizes frame by frame, training resizes stacks: the same frame must give the same bytes.
    stack = np.random.default_rng(size).integers(0, 256, (4, 21, 26, 3), dtype=np.uint8)
    batch = resize_uint8(stack, size)
    for i in range(4):
        assert torch.equal(resize_uint8(stack[i], size), batch[i])


def test_resize_values():
    # A constant image stays constant both ways (no rounding drift); a 2x2 -> 1x1 antialiased downscale
    # averages the pixels in two separable passes, each rounded to uint8: channel 1 is rows (10, 20) -> 15
    # and (30, 41) -> 36 (35.5 rounds up), then (15, 36) -> 26, where one float pass would give 25.25 -> 25.
    flat = np.full((10, 10, 3), 137, dtype=np.uint8)
    assert resize_uint8(flat, 4).unique().tolist() == [137]
    assert resize_uint8(flat, 25).unique().tolist() == [137]
    quad = np.array([[[0, 10, 200], [100, 20, 200]], [[0, 30, 200], [100, 41, 200]]], dtype=np.uint8)
    got = resize_uint8(quad, 1)[:, 0, 0].tolist()
    assert got == [50, 26, 200]
    # Upscaling 1 px wide columns interpolates between them: the middle of a 0 -> 255 step is ~128.
    step = np.zeros((2, 2, 3), dtype=np.uint8)
    step[:, 1] = 255
    row = resize_uint8(step, 4)[0, 0].tolist()
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row) and 60 <= row[1] <= 70


def test_resize_rejects_other_dtypes_and_layouts():
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        resize_uint8(np.zeros((8, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match="got uint8 \\(3, 8, 8\\)"):
        resize_uint8(np.zeros((3, 8, 8), np.uint8), 4)
    with pytest.raises(ValueError, match="size must be >= 1"):
        resize_uint8(np.zeros((8, 8, 3), np.uint8), 0)


def test_upscale_nearest_integer_factor():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    up = upscale_nearest(img, 5)  # shorter side 2 -> factor 3
    assert up.shape == (6, 9, 3)
    np.testing.assert_array_equal(up[::3, ::3], img)
    np.testing.assert_array_equal(up[2, 8], img[0, 2])
    big = np.zeros((300, 256, 3), np.uint8)
    assert upscale_nearest(big, 256) is big
    assert upscale_nearest(np.zeros((64, 64, 3), np.uint8), 256).shape == (256, 256, 3)
