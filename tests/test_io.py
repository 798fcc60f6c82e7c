"""NIfTI I/O: atomic writes with normal permissions, clear errors."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from qsmprep.errors import DataError, NoInputError
from qsmprep.io import (
    check_same_grid,
    load_nifti,
    nifti_values,
    save_nifti,
    sidecar_path,
    write_atomic,
    write_text_atomic,
)


def test_round_trip_and_umask_permissions(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = save_nifti(tmp_path / "sub" / "x.nii.gz", data, np.diag([1, 2, 3, 1]))
    loaded, affine, _ = load_nifti(path)
    np.testing.assert_array_equal(loaded, data)
    assert affine[1, 1] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["x.nii.gz"]  # no temporary left


def test_every_atomic_write_has_umask_permissions_and_leaves_nothing_when_it_fails(tmp_path):
    # the one writer behind NIfTI, JSON sidecars, checkpoints and qsmprep-eval --json (mkstemp alone makes 0600)
    path = write_text_atomic(tmp_path / "metrics.json", "{}\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "{}\n" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def fails(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails)
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_missing_and_broken_files_name_the_file(tmp_path):
    with pytest.raises(NoInputError, match="nope.nii.gz"):
        load_nifti(tmp_path / "nope.nii.gz", "field map")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(NoInputError, match="broken.nii.gz"):
        load_nifti(broken)
    with pytest.raises(NoInputError, match=f"field map {tmp_path} is a folder, not a file"):
        load_nifti(tmp_path, "field map")
    with pytest.raises(NoInputError, match=f"phase image {tmp_path} is a folder, not a file"):
        nifti_values(tmp_path, "phase image")


def test_check_same_grid():
    eye = np.eye(4)
    check_same_grid("a", ((4, 4, 4), eye), "b", ((4, 4, 4), eye))
    with pytest.raises(DataError, match="b has shape"):
        check_same_grid("a", ((4, 4, 4), eye), "b", ((4, 4, 5), eye))
    with pytest.raises(DataError, match="different affines"):
        check_same_grid("a", ((4, 4, 4), eye), "b", ((4, 4, 4), np.diag([2, 1, 1, 1])))


def test_sidecar_path_replaces_only_the_file_name_extension():
    """A folder whose name holds ".nii" is kept (the report once replaced the first ".nii" anywhere in the path)."""
    assert sidecar_path("derivatives.nii_copy/sub-01_Chimap.nii.gz") == Path("derivatives.nii_copy/sub-01_Chimap.json")
    assert sidecar_path(Path("a/sub-01_T2starw.nii")) == Path("a/sub-01_T2starw.json")
