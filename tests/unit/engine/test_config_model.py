"""Config validation, backbone surgery and the schedule."""

import numpy as np
import pytest
import torch
from torch import nn

from diet_engine.engine.config import ConfigError, RunConfig
from diet_engine.engine.model import build_backbone, build_model
from diet_engine.engine.schedule import warmup_cosine


def test_config_set_coerces_and_names_bad_options():
    cfg = RunConfig()
    cfg.set("optim.lr", "2e-3")
    cfg.set("train.batch_size", "64")
    cfg.set("model.normalize", "true")
    cfg.set("optim.betas", "0.8,0.99")
    assert cfg.optim.lr == 2e-3 and cfg.train.batch_size == 64 and cfg.model.normalize is True
    assert cfg.optim.betas == (0.8, 0.99)
    with pytest.raises(ConfigError, match="optim.lrr"):
        cfg.set("optim.lrr", "1")
    with pytest.raises(ConfigError, match="train.batch_size"):
        cfg.set("train.batch_size", "many")
    cfg.head.store = "memory"
    cfg.head.loss = "full"
    with pytest.raises(ConfigError, match="head.loss"):
        cfg.validate()


def test_config_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.set("head.store", "disk")
    cfg.save(tmp_path / "c.json")
    again = RunConfig.load(tmp_path / "c.json")
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="nosuch"):
        RunConfig.from_dict({"nosuch": {}})


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_b_16", "convnext_tiny", "efficientnet_b0"])
def test_backbone_classifier_removed(name):
    net, k = build_backbone(name)
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in net.modules())
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, k)


def test_small_stem_and_projector():
    cfg = RunConfig()
    cfg.model.projector = "mlp"
    cfg.model.projector_hidden, cfg.model.projector_out = 64, 32
    cfg.model.normalize = True
    m = build_model(cfg.model, image_size=16)
    assert m.backbone.conv1.kernel_size == (3, 3) and isinstance(m.backbone.maxpool, nn.Identity)
    z = m(torch.randn(4, 3, 16, 16))
    assert z.shape == (4, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert m.features(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19")


def test_warmup_cosine():
    lrs = warmup_cosine(1.0, 100, 10, 0.0)
    assert lrs.shape == (100,)
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(lrs[10:]) <= 1e-15)
