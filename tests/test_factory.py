"""vig.models.factory.create_model: the one way the trainer and the tools build a model from its settings."""
from __future__ import annotations

import pytest
import timm
import torch

import vig  # noqa: F401 - registers the models
from vig.model_settings import ModelSettings
from vig.models.factory import create_model


@pytest.mark.parametrize(("settings", "num_classes", "expected"), [
    # every setting given: the same model as timm.create_model with them
    (ModelSettings(model="vig_ti_cifar", img_size=32, start_thresh=0.8, dec=0.02, model_kwargs={"channels": 24,
                                                                                                "depth": 2}),
     5, {"img_size": 32, "start_thresh": 0.8, "dec": 0.02, "channels": 24, "depth": 2, "num_classes": 5}),
    # the argument's class count wins over the settings', model_kwargs win over both
    (ModelSettings(model="vig_ti_cifar", num_classes=7, model_kwargs={"channels": 24, "depth": 2}), 5,
     {"channels": 24, "depth": 2, "num_classes": 5}),
    (ModelSettings(model="vig_ti_cifar", num_classes=7, model_kwargs={"channels": 24, "depth": 2,
                                                                      "num_classes": 3}), None,
     {"channels": 24, "depth": 2, "num_classes": 3}),
])
def test_the_factory_builds_what_timm_builds_from_the_same_arguments(settings: ModelSettings,
                                                                     num_classes: int | None,
                                                                     expected: dict) -> None:
    torch.manual_seed(0)
    built = create_model(settings, num_classes).state_dict()
    torch.manual_seed(0)
    reference = timm.create_model(settings.model, **expected).state_dict()
    assert list(built) == list(reference)
    torch.testing.assert_close(built, reference, rtol=0, atol=0)


def test_a_model_without_an_img_size_argument_is_built_at_its_own_size(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="vig.models.factory"):
        model = create_model(ModelSettings(model="resnet10t", img_size=48), 3, drop_rate=0.25)
    assert (model.num_classes, model.drop_rate) == (3, 0.25)
    assert "resnet10t takes no img_size argument" in caplog.text
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        create_model(ModelSettings(model="resnet10t", model_kwargs={"bogus": 1}))
