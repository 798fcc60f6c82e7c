"""Presets and the default inversion, with and without the shipped deep model (docs/usage.md, Presets)."""

import numpy as np
import pytest

from qsmprep import config
from qsmprep.errors import UsageError


@pytest.mark.parametrize(
    ("available", "default", "presets"),
    [
        # docs/usage.md: default = deep (the shipped model); research = deep, TKD, closed-form L2, iLSQR
        (True, "deep", {"fast": ("tkd",), "default": ("deep",), "research": ("deep", "tkd", "cfl2", "ilsqr", "tv")}),
        # a stripped install: default falls back to iLSQR, research drops deep
        (False, "ilsqr", {"fast": ("tkd",), "default": ("ilsqr",), "research": ("tkd", "cfl2", "ilsqr", "tv")}),
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


def test_every_method_offered_has_a_library_function():
    """The method names the CLIs offer (config's tuples) are those ``library_function`` finds, and no others."""
    offered = {"mask": config.MASK_STRATEGIES, "bgremove": config.BGREMOVE_METHODS, "inversion": config.INVERSION_METHODS}
    assert sorted(config.LIBRARY_FUNCTIONS) == sorted((step, m) for step, methods in offered.items() for m in methods)
    assert all(callable(config.library_function(step, method)) for step, method in config.LIBRARY_FUNCTIONS)


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


def test_parameters_file_messes_a_researcher_makes_are_read_or_named(tmp_path):
    """A byte-order mark (Windows editors) is read as UTF-8; Latin-1 text, a key outside any table, a pad_factor
    whose padded grid would not fit in memory, and a deep tile overlap that tiles could not advance past are
    refused (exit 64) naming the file and what to do."""
    path = tmp_path / "parameters.toml"
    path.write_bytes(b"\xef\xbb\xbf[inversion.tkd]\nthreshold = 0.1\n")
    assert config.read_parameters_file(path) == {"inversion": {"tkd": {"threshold": 0.1}}}
    path.write_text("[inversion.tkd]\npad_factor = 4\n[inversion.deep]\noverlap = 63\n")
    assert config.read_parameters_file(path) == {"inversion": {"tkd": {"pad_factor": 4}, "deep": {"overlap": 63}}}
    for content, words in [
        ("# réglages\n[inversion.tkd]\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3): save it as "
                                                           "UTF-8."),
        (b"threshold = 0.1\n[inversion.tkd]\n", "threshold = 0.1 is outside any table: put each parameter in its "
                                                "method's table [step.method], e.g. threshold = 0.15 under "
                                                "[inversion.tkd]."),
        (b"[inversion.cfl2]\npad_factor = 1e300\n", "[inversion.cfl2] pad_factor must be a number from 1 to 4 (the "
                                                    "padded grid's memory grows with its cube), got 1e+300."),
        (b"[bgremove.pdf]\npad_factor = 4.5\n", "[bgremove.pdf] pad_factor must be a number from 1 to 4"),
        (b"[inversion.deep]\noverlap = 64\n", "[inversion.deep] overlap must be an integer from 0 to 63 (below the "
                                              "smallest tile edge, 64, so that tiles advance), got 64."),
    ]:
        path.write_bytes(content)
        with pytest.raises(UsageError) as exc:
            config.read_parameters_file(path)
        assert str(path) in str(exc.value) and words in str(exc.value), str(exc.value)


def test_the_deep_overlap_check_is_what_tiling_needs():
    """Tiles of the smallest edge (MIN_TILE, which the memory sizing and the out-of-memory retries may choose)
    cover a volume exactly for every overlap the parameters file accepts; the first it refuses leaves voxels out."""
    from qsmprep.inversion.deep import MIN_TILE, predict_tiled

    field = np.random.default_rng(0).random((100, 70, 65)).astype(np.float32)
    ok = config.parameter_checks("inversion", "deep")["overlap"][1]
    for overlap in (0, 32, MIN_TILE - 1):
        assert ok(overlap)
        np.testing.assert_array_equal(predict_tiled(lambda f, m: f, field, field, (MIN_TILE,) * 3, overlap), field)
    assert not ok(MIN_TILE + 36)
    assert (predict_tiled(lambda f, m: f, field, field, (MIN_TILE,) * 3, MIN_TILE + 36) == 0).mean() > 0.5


def test_the_pipeline_high_pass_radius_is_the_default_of_both_inversions_that_have_one():
    """deep's refinement and TV get 8 mm in the pipeline (the library's default is off); a value given wins."""
    def resolved(**given):
        return config.Config(bids_dir="/data", output_dir="/out", work_dir="/work", inversion=("deep", "tv"),
                             parameters={"inversion": given}).resolve_parameters().parameters["inversion"]

    default = resolved()
    assert default["deep"]["refine_radius_mm"] == default["tv"]["harmonic_radius_mm"] == 8.0
    assert default["deep"]["refine_lambda"] == 0.05  # the other values stay the library's
    given = resolved(deep={"refine_radius_mm": 0.0}, tv={"harmonic_radius_mm": 5.0})
    assert (given["deep"]["refine_radius_mm"], given["tv"]["harmonic_radius_mm"]) == (0.0, 5.0)


def test_the_inversions_high_pass_is_on_only_where_its_method_applies_it():
    from qsmprep.config import inversion_high_pass_mm

    assert inversion_high_pass_mm("tv", {"harmonic_radius_mm": 8.0}) == 8.0
    assert inversion_high_pass_mm("deep", {"refine_radius_mm": 8.0}) == 8.0  # refine_iters unset: deep_invert's 10
    assert inversion_high_pass_mm("deep", {"refine_radius_mm": 8.0, "refine_iters": 0}) == 0  # nothing refined
    assert inversion_high_pass_mm("tv", {"harmonic_radius_mm": None}) == 0 and inversion_high_pass_mm("tv", {}) == 0
    assert inversion_high_pass_mm("tkd", {"harmonic_radius_mm": 8.0}) == 0  # TKD has no high-pass
