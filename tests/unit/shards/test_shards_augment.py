"""engine/augment.py: DIET's three augmentation strengths and the eval transform."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from diet_engine.engine.augment import make_eval_transform, make_train_transform


def _kinds(t):
    out = []
    for m in t.transforms:
        out.append(type(m).__name__)
        if isinstance(m, v2.RandomApply):
            out += [type(x).__name__ for x in m.transforms]
    return out


def test_strengths_follow_the_paper():
    k1, k2, k3 = (_kinds(make_train_transform(16, s, [0.5], [0.2])) for s in (1, 2, 3))
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "Normalize", "RandomErasing"} <= set(k1)
    assert "ColorJitter" not in k1 and "GaussianBlur" not in k1
    assert {"ColorJitter", "RandomGrayscale"} <= set(k2) and "GaussianBlur" not in k2
    assert {"ColorJitter", "RandomGrayscale", "GaussianBlur"} <= set(k3)
    t = make_train_transform(16, 2, [0.5], [0.2], crop_scale=(0.3, 0.9), flip=False, erasing=0)
    kinds = _kinds(t)
    assert "RandomHorizontalFlip" not in kinds and "RandomErasing" not in kinds
    rrc = next(m for m in t.transforms if isinstance(m, v2.RandomResizedCrop))
    assert tuple(rrc.scale) == (0.3, 0.9)
    jitter = next(m for m in t.transforms if isinstance(m, v2.RandomApply))
    assert jitter.p == 0.3


@pytest.mark.parametrize("strength", [1, 2, 3])
@pytest.mark.parametrize(("cin", "channels", "cout"), [(1, None, 1), (1, 3, 3), (3, None, 3), (3, 1, 1), (1, 1, 1)])
def test_shapes_and_channels(strength, cin, channels, cout):
    x = torch.randint(0, 256, (cin, 8, 11), dtype=torch.uint8)
    mean = [0.4] if channels == 1 or cin == 1 else [0.4, 0.5, 0.6]
    y = make_train_transform(12, strength, mean, [0.25] * len(mean), channels=channels)(x)
    assert y.shape == (cout, 12, 12) and y.dtype == torch.float32


def test_eval_is_deterministic_and_normalises():
    x = torch.full((1, 8, 8), 51, dtype=torch.uint8)  # 0.2 in [0, 1] units
    t = make_eval_transform(16, [0.3], [0.5], channels=3)
    y = t(x)
    assert y.shape == (3, 16, 16)
    torch.testing.assert_close(y, torch.full((3, 16, 16), (0.2 - 0.3) / 0.5))
    z = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    t = make_eval_transform(16, [0.5] * 3, [0.2] * 3, crop_ratio=0.875)
    torch.testing.assert_close(t(z), t(z))
    assert t(z).shape == (3, 16, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strength"):
        make_train_transform(16, 4, [0.5], [0.2])
    with pytest.raises(ValueError, match="mean has 2 values"):
        make_train_transform(16, 1, [0.5, 0.5], [0.2], channels=3)
    with pytest.raises(ValueError, match="crop_scale"):
        make_train_transform(16, 1, [0.5], [0.2], crop_scale=(0.0, 1.0))
