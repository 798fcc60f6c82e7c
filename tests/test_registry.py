"""Checkpoints: safetensors with JSON metadata, loaded into the right architecture or refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qsmprep.deep.models import ARCHITECTURES, build_model
from qsmprep.deep.registry import load_model, read_tensors, save_checkpoint
from qsmprep.errors import DataError, NoInputError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_gives_identical_outputs(tmp_path, arch):
    torch.manual_seed(0)
    model = build_model(arch, width=4, depth=2)
    field = 0.05 * torch.randn(1, 1, 20, 20, 20)
    model(field, voxel_size=torch.tensor([0.5, 0.5, 2.0]))  # one training-mode pass moves BN statistics
    model.eval()
    path = tmp_path / f"{arch}.safetensors"
    save_checkpoint(model, path, {"step": 7, "validation": {"nrmse": 50.0}})
    loaded, meta = load_model(path)
    assert meta["arch"] == arch and meta["step"] == 7 and meta["params"] == model.params
    assert meta["conventions"]["units"] == "field and chi in ppm"
    assert json.loads((tmp_path / f"{arch}.json").read_text()) == meta
    assert not loaded.training
    kw = {"mask": (field.abs() < 0.08).float(), "voxel_size": torch.tensor([0.5, 0.5, 2.0])}
    torch.testing.assert_close(loaded(field, **kw), model(field, **kw), rtol=0, atol=0)


def _tamper(path, tensors=None, meta=None):
    old_tensors, old_meta = read_tensors(path)
    tensors = old_tensors if tensors is None else tensors
    metadata = None if meta is False else {"qsmprep": json.dumps(old_meta if meta is None else meta)}
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_checkpoint(build_model("unet", width=4, depth=2), path)
    return path


def test_refuses_checkpoint_without_metadata(checkpoint):
    _tamper(checkpoint, meta=False)
    with pytest.raises(DataError, match="no qsmprep metadata") as err:
        load_model(checkpoint)
    assert str(checkpoint) in str(err.value)


def test_refuses_unknown_architecture(checkpoint):
    meta = read_tensors(checkpoint)[1]
    _tamper(checkpoint, meta={**meta, "arch": "deepqsm"})
    with pytest.raises(DataError, match="unknown architecture 'deepqsm'"):
        load_model(checkpoint)


def test_refuses_mismatched_params_and_shapes(checkpoint):
    meta = read_tensors(checkpoint)[1]
    _tamper(checkpoint, meta={**meta, "params": {**meta["params"], "width": 8}, "conventions": meta["conventions"]})
    with pytest.raises(DataError, match="tensors do not match") as err:
        load_model(checkpoint)
    assert str(checkpoint) in str(err.value)


def test_refuses_wrong_tensor_shape(checkpoint):
    tensors = load_file(str(checkpoint))
    tensors["net.head.weight"] = torch.zeros(1, 4, 1, 1, 2)
    _tamper(checkpoint, tensors=tensors)
    with pytest.raises(DataError, match="net.head.weight"):
        load_model(checkpoint)


def test_refuses_other_convention_version_or_changed_conventions(checkpoint):
    meta = read_tensors(checkpoint)[1]
    _tamper(checkpoint, meta={**meta, "conventions": {**meta["conventions"], "convention_version": 0}})
    with pytest.raises(DataError, match="convention version"):
        load_model(checkpoint)
    _tamper(checkpoint, meta={**meta, "conventions": {**meta["conventions"], "input_scale": 100.0}})
    with pytest.raises(DataError, match="conventions"):
        load_model(checkpoint)


def test_refuses_non_safetensors_and_missing(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_model(bad)
    with pytest.raises(NoInputError, match="no shipped model named 'nonexistent'"):
        load_model("nonexistent")
    with pytest.raises(NoInputError, match=f"checkpoint {tmp_path} is a folder, not a file"):  # e.g. qsmprep-train's
        load_model(tmp_path)


def test_round_trip_keeps_amplitude_normalisation(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2, normalise_amplitude=True).eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert meta["params"]["normalise_amplitude"] is True
    field = 0.05 * torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(3.0 * field), 3.0 * model(field), rtol=1e-4, atol=1e-9)
