"""Presets and the default inversion, with and without the shipped deep model (docs/usage.md, Presets)."""

import pytest

from qsmprep import config
from qsmprep.errors import UsageError


@pytest.mark.parametrize(
    ("available", "default", "presets"),
    [
        # docs/usage.md: default = deep (the shipped model); research = deep, TKD, closed-form L2, iLSQR
        (True, "deep", {"fast": ("tkd",), "default": ("deep",), "research": ("deep", "tkd", "cfl2", "ilsqr")}),
        # a stripped install: default falls back to iLSQR, research drops deep
        (False, "ilsqr", {"fast": ("tkd",), "default": ("ilsqr",), "research": ("tkd", "cfl2", "ilsqr")}),
    ],
)
def test_presets_follow_the_model_file(monkeypatch, available, default, presets):
    monkeypatch.setattr(config, "deep_model_available", lambda: available)
    assert config.default_inversion() == default
    for name, inversions in presets.items():
        assert config.preset_methods(name) == ("laplacian", "vsharp", inversions)


def test_model_availability_is_the_model_file(monkeypatch, tmp_path):
    from qsmprep.inversion import deep

    assert config.deep_model_available()  # the model ships in this checkout
    monkeypatch.setattr(deep, "default_model_path", lambda: tmp_path / "absent.safetensors")
    assert not config.deep_model_available()
    assert config.preset_methods("default") == ("laplacian", "vsharp", ("ilsqr",))


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown preset 'slow'.*fast, default, research"):
        config.preset_methods("slow")
