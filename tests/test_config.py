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


def test_parameter_checks_cover_every_tunable_parameter_of_each_library_function():
    """A parameters file may set each tunable parameter (the deep options with flags excepted), and no other name."""
    for step, method in config.LIBRARY_FUNCTIONS:
        names = set(config.default_parameters(step, method))
        if method == "deep":
            names -= set(config.DEEP_FLAG_PARAMETERS)
        assert set(config.parameter_checks(step, method)) == names, (step, method)


def test_parameters_file_is_read_and_checked(tmp_path):
    from qsmprep.errors import NoInputError

    good = tmp_path / "good.toml"
    good.write_text("[mask.quality]\nerode_mm = 2\nfill_holes = false\n[bgremove.vsharp]\nradii_mm = [12, 8.5]\n"
                    "[inversion.tkd]\nthreshold = 0.15\n[inversion.deep]\nresolution_tolerance = inf\ntile_shape = 96\n")
    assert config.read_parameters_file(good) == {
        "mask": {"quality": {"erode_mm": 2, "fill_holes": False}}, "bgremove": {"vsharp": {"radii_mm": [12, 8.5]}},
        "inversion": {"tkd": {"threshold": 0.15}, "deep": {"resolution_tolerance": float("inf"), "tile_shape": 96}}}
    bad = tmp_path / "bad.toml"
    for text, words in [
        ("[inversion.tkd]\nthreshold = 0.5", "[inversion.tkd] threshold must be a number in (0, 1/3], got 0.5"),
        ("[inversion.tkd]\nthreshhold = 0.1", "unknown [inversion.tkd] key(s) ['threshhold']; known: ['pad_factor',"),
        ("[inversion.medi]\nlam = 1", "[inversion.medi] is not a method of inversion; choose among ['tkd',"),
        ("[unwrap.laplacian]\ntol = 1", "[unwrap] is not a step with parameters"),
        ("[mask]\nerode_mm = 2", "erode_mm under [mask] is not in a method's table: put the parameters of each "
         "method in its own, e.g. [mask.quality]"),
        ("[inversion.deep]\nrefine_iters = 3", "[inversion.deep] sets refine_iters (give --refine)"),
        ("[bgremove.resharp]\nmax_iter = 2.5", "[bgremove.resharp] max_iter must be a positive integer, got 2.5"),
        ("[mask.magnitude]\nfill_holes = 1", "[mask.magnitude] fill_holes must be true or false, got 1"),
        ("[bgremove.pdf]\ntol = nan", "[bgremove.pdf] tol must be a positive number, got nan"),
        ("[inversion.deep]\ntile_shape = [96, 96]", "tile_shape must be an integer >= 64 (a cube) or three of them"),
        ("[inversion.tkd\nthreshold = 0.1", "is not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(UsageError) as exc:
            config.read_parameters_file(bad)
        assert str(bad) in str(exc.value) and words in str(exc.value), str(exc.value)
    with pytest.raises(NoInputError, match="does not exist: check --parameters"):
        config.read_parameters_file(tmp_path / "absent.toml")
