"""Images of any size made fit for a patch-16 model: `Fitted` and the size it predicts from the header alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from vtp_fast.data.images import Fitted, fitted_size, to_tensor


@pytest.mark.parametrize("wh", [(600, 400), (40, 33), (16, 16), (7, 30), (2000, 900)])
@pytest.mark.parametrize("resize", ["pad", "crop", "fit"])
def test_fitted_sizes_are_patch_multiples_as_predicted_and_pad_crops_back(wh, resize):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    if resize == "crop" and min(wh) < 16:
        with pytest.raises(Exception, match="smaller than one patch"):
            Fitted(img, 16, resize)
        return
    f = Fitted(img, 16, resize, max_side=512)
    h, w = f.pixels.shape[1:]
    assert h % 16 == 0 and w % 16 == 0
    assert (w, h) == fitted_size(wh, 16, resize, max_side=512)
    restored = f.restore(f.pixels)
    if resize == "pad":  # the content is the image itself, untouched
        assert torch.equal(restored, to_tensor(img))
    elif resize == "crop":
        assert restored.shape == f.pixels.shape and w <= wh[0] < w + 16 and h <= wh[1] < h + 16
    else:
        assert max(restored.shape[1:]) == min(512, max(wh))


def test_size_gives_one_square():
    img = Image.new("RGB", (600, 400))
    assert Fitted(img, 16, size=64).pixels.shape == (3, 64, 64) and fitted_size((600, 400), 16, size=64) == (64, 64)
