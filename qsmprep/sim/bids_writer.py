"""Write simulated acquisitions as a BIDS raw dataset with a ground-truth derivative.

Layout (BIDS 1.9, MEGRE with the ``echo`` and ``part`` entities)::

    OUT/dataset_description.json  participants.tsv  README  CHANGES
    OUT/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_echo-N_part-{mag,phase}_MEGRE.nii.gz (+ .json)
        (one echo: sub-XX[_ses-YY]_part-{mag,phase}_T2starw.nii.gz, without the echo entity)
    OUT/derivatives/groundtruth/dataset_description.json  dseg.tsv
    OUT/derivatives/groundtruth/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_Chimap.nii.gz (+ .json, ppm)
        ..._desc-{local,total,background}_fieldmap.nii.gz (+ .json, ppm)
        ..._desc-brain_mask.nii.gz  ..._dseg.nii.gz

The pipeline reads only the raw part; the ground truth sits in a
derivative dataset it never indexes as input.
"""

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..bids.derivatives import generated_by_names
from ..errors import DataError
from ..io import read_json_object, read_text_utf8, save_nifti, sidecar_path, write_text_atomic
from .gre import VENDOR_PHASE_MAX, phase_to_vendor_units
from .phantom import CHI_PPM, LABELS

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
PHASE_UNITS = ("arbitrary", "rad")
SIMULATE_UTF8_FIX = "save it as UTF-8, as BIDS requires, then simulate again."

_README = """\
# {name}

Multi-echo gradient-echo (MEGRE) magnitude and phase simulated by
`qsmprep-simulate` (qsmprep {version}) from a procedural numerical head
phantom: no subject data. Phase is stored in `{phase_units}` units{phase_note}.

The known answers (susceptibility `Chimap` in ppm, local/total/background
field maps in ppm, brain mask and tissue labels) are in
`derivatives/groundtruth/`. See qsmprep's docs/simulator.md for the model.
"""

_TRUTH_README = """\
# {name}: ground truth

The known answers of the simulated dataset two levels up (`bids:raw:`), on
the grid of its images: `Chimap` (susceptibility in ppm relative to CSF,
inside the brain mask), `desc-local`, `desc-total` and `desc-background`
`fieldmap` (ppm), `desc-brain_mask` and the tissue labels `dseg` (names and
chi in `dseg.tsv`). Written by `qsmprep-simulate` (qsmprep {version}).
"""


def _write_json(path, content):
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def _scanner_header(affine):
    """NIfTI header with qform and sform set to ``affine`` as scanner coordinates, units mm and s."""
    header = nib.Nifti1Header()
    header.set_qform(affine, code="scanner")
    header.set_sform(affine, code="scanner")
    header.set_xyzt_units("mm", "sec")
    return header


def _entities(subject, session):
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    folder = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
    return prefix, folder


def _read_participants(path):
    """Columns and rows (dicts) of the participants.tsv at ``path``; (["participant_id"], []) if there is none.

    DataError when it is not UTF-8 text or has no participant_id column, which merging new subjects needs.
    """
    if not path.is_file():
        return ["participant_id"], []
    reader = csv.DictReader(io.StringIO(read_text_utf8(path, fix=SIMULATE_UTF8_FIX), newline=""), delimiter="\t")
    columns, rows = reader.fieldnames or ["participant_id"], list(reader)
    if "participant_id" not in columns:
        raise DataError(f"{path} has no participant_id column (its header is {' '.join(columns)!r}): make "
                        "participant_id its first column, as BIDS requires, then simulate again.")
    return columns, rows


def _participants(path, subjects):
    """participants.tsv with the existing rows and columns kept and a row for each new subject (n/a beyond its id)."""
    columns, rows = _read_participants(path)
    known = {row["participant_id"] for row in rows}
    rows += [{"participant_id": label} for label in dict.fromkeys(f"sub-{s}" for s in subjects) if label not in known]
    rows.sort(key=lambda row: row["participant_id"] or "")
    return "".join("\t".join(line) + "\n" for line in [columns] + [[row.get(c) or "n/a" for c in columns] for row in rows])


def _read_description(out_dir):
    """The dataset_description.json of ``out_dir`` as a dict, or None when there is none.

    DataError when it is not UTF-8 JSON holding an object: a dataset whose description cannot be read is
    neither kept as it is nor taken for a simulated one.
    """
    path = Path(out_dir) / "dataset_description.json"
    if not path.is_file():
        return None
    return read_json_object(path, fix="fix it (BIDS needs a UTF-8 JSON object with Name and BIDSVersion), or give "
                                      "another directory.")


def made_by_simulator(out_dir):
    """True when ``out_dir`` holds no dataset yet, or one whose dataset_description.json names qsmprep-simulate.

    DataError when its dataset_description.json cannot be read (``_read_description``).
    """
    description = _read_description(out_dir)
    if description is None:
        return True
    return "qsmprep-simulate" in generated_by_names(description)


def check_dataset_files(out_dir):
    """Raise DataError unless the files of ``out_dir`` that ``write_dataset_files`` reads can be read.

    They are its dataset_description.json and its participants.tsv, whose rows new subjects are merged into.
    Call it before writing any subject, so that a bad file stops the run before anything is written rather
    than after.
    """
    _read_description(out_dir)
    _read_participants(Path(out_dir) / "participants.tsv")


def remove_earlier_simulation(out_dir):
    """Delete what an earlier qsmprep-simulate run wrote into ``out_dir``, so that simulating again replaces it.

    Only in a dataset the simulator made (``made_by_simulator``, with a
    dataset_description.json): its subject folders, their ground truth and
    participants.tsv; anything else (e.g. derivatives/qsmprep) is left.
    Returns the number of subject folders removed.
    """
    out_dir = Path(out_dir)
    if not ((out_dir / "dataset_description.json").is_file() and made_by_simulator(out_dir)):
        return 0
    subjects = [p for p in out_dir.glob("sub-*") if p.is_dir()]
    for folder in [*subjects, *(out_dir / "derivatives" / "groundtruth").glob("sub-*")]:
        shutil.rmtree(folder)
    (out_dir / "participants.tsv").unlink(missing_ok=True)
    return len(subjects)


def acquisition_bytes(shape, echoes, phase_units="arbitrary"):
    """Bytes of the images ``write_subject`` writes for one acquisition on a ``shape`` matrix, uncompressed.

    Per voxel: each echo's float32 magnitude and phase (int16 for "arbitrary" units, float32 for "rad"), and
    the ground truth's float32 chi and three field maps and uint8 mask and labels. gzip saves little on noisy
    images (the default dataset takes 50 MB on disk of 72 MB), so this bounds the disk space the acquisition
    needs, the sidecars' few kB aside.
    """
    phase_bytes = 2 if phase_units == "arbitrary" else 4
    return int(np.prod(shape, dtype=float)) * (echoes * (4 + phase_bytes) + 4 * 4 + 2)


def write_subject(out_dir, subject, session, gre, phase_units="arbitrary"):
    """Write one acquisition's raw MEGRE (one echo: T2starw) files and its ground truth; return the raw paths.

    Parameters
    ----------
    out_dir : str or Path
        Dataset root.
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``, or None for no session level.
    gre : SimulatedGRE
    phase_units : {"arbitrary", "rad"}, default "arbitrary"
        "arbitrary": int16 vendor-style phase (``phase_to_vendor_units``);
        "rad": float32 radians.
    """
    if phase_units not in PHASE_UNITS:
        raise ValueError(f"phase_units must be one of {PHASE_UNITS}, got {phase_units!r}")
    out_dir = Path(out_dir)
    prefix, folder = _entities(subject, session)
    header = _scanner_header(gre.affine)
    common = {
        "MagneticFieldStrength": gre.b0_tesla,
        "EchoTrainLength": len(gre.te_s),
        "MRAcquisitionType": "3D",
        "Manufacturer": "qsmprep-simulate",
    }
    written = []
    multi_echo = len(gre.te_s) > 1  # BIDS: echo-<n>_..._MEGRE for several echoes, ..._T2starw for one
    suffix = "MEGRE" if multi_echo else "T2starw"
    for n, te in enumerate(gre.te_s, start=1):
        stem = out_dir / folder / (f"{prefix}_echo-{n}" if multi_echo else prefix)
        mag = stem.with_name(f"{stem.name}_part-mag_{suffix}.nii.gz")
        save_nifti(mag, gre.magnitude[..., n - 1], gre.affine, header)
        _write_json(sidecar_path(mag),
                    {**common, "EchoTime": te, "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]})  # fmt: skip
        phase = stem.with_name(f"{stem.name}_part-phase_{suffix}.nii.gz")
        if phase_units == "arbitrary":
            save_nifti(phase, phase_to_vendor_units(gre.phase_rad[..., n - 1]), gre.affine, header, dtype=np.int16)
        else:
            save_nifti(phase, gre.phase_rad[..., n - 1], gre.affine, header)
        _write_json(sidecar_path(phase),
                    {**common, "EchoTime": te, "Units": phase_units,
                     "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]})  # fmt: skip
        written += [mag, phase]

    truth = out_dir / "derivatives" / "groundtruth" / folder
    ppm = {"Units": "ppm", "MagneticFieldStrength": gre.b0_tesla}
    save_nifti(truth / f"{prefix}_Chimap.nii.gz", gre.chi_ppm, gre.affine, header)
    _write_json(truth / f"{prefix}_Chimap.json", {**ppm, "Description": "Ground-truth susceptibility inside the brain mask, relative to CSF."})
    for desc, field, text in (
        ("local", gre.local_field_ppm, "Field of the brain's susceptibility, inside the brain mask."),
        ("total", gre.total_field_ppm, "Field of all sources, minus its mean over the brain."),
        ("background", gre.background_field_ppm, "Total field minus the field of the brain's susceptibility."),
    ):
        save_nifti(truth / f"{prefix}_desc-{desc}_fieldmap.nii.gz", field, gre.affine, header)
        _write_json(truth / f"{prefix}_desc-{desc}_fieldmap.json", {**ppm, "Description": text, "B0Direction": list(gre.b0_dir)})
    save_nifti(truth / f"{prefix}_desc-brain_mask.nii.gz", gre.brain_mask, gre.affine, header, dtype=np.uint8)
    save_nifti(truth / f"{prefix}_dseg.nii.gz", gre.labels, gre.affine, header, dtype=np.uint8)
    return written


DATASET_NAME = "qsmprep simulated MEGRE"
"""The simulated dataset's default name (dataset_description.json, README)."""


def write_dataset_files(out_dir, subjects, phase_units="arbitrary", name=DATASET_NAME):
    """Write (or update) the dataset-level files of the raw and ground-truth datasets.

    ``subjects``: subject labels (without ``sub-``) to list in participants.tsv,
    merged with the rows and columns already there. In a dataset qsmprep-simulate
    did not make (``made_by_simulator``), its dataset_description.json, README,
    CHANGES and .bidsignore are kept as they are. ``phase_units`` ("arbitrary" or "rad", as the subjects were
    written) and ``name`` (default ``DATASET_NAME``) go into the README and the descriptions.
    """
    out_dir = Path(out_dir)
    generated_by = [{"Name": "qsmprep-simulate", "Version": __version__}]
    if made_by_simulator(out_dir):
        _write_json(out_dir / "dataset_description.json",
                    {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "GeneratedBy": generated_by})  # fmt: skip
        note = f" (phase_rad = value * pi / {VENDOR_PHASE_MAX})" if phase_units == "arbitrary" else ""
        write_text_atomic(out_dir / "README", _README.format(name=name, version=__version__, phase_units=phase_units,
                                                             phase_note=note))
        write_text_atomic(out_dir / "CHANGES", f"1.0.0\n  - Simulated by qsmprep-simulate {__version__}.\n")
        write_text_atomic(out_dir / ".bidsignore", "derivatives/\n")
    write_text_atomic(out_dir / "participants.tsv", _participants(out_dir / "participants.tsv", subjects))
    truth = out_dir / "derivatives" / "groundtruth"
    _write_json(truth / "dataset_description.json", {
        "Name": f"{name}: ground truth", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": generated_by, "SourceDatasets": [{"URL": "bids:raw:"}], "DatasetLinks": {"raw": "../../"},
    })  # fmt: skip
    write_text_atomic(truth / "README", _TRUTH_README.format(name=name, version=__version__))
    rows = ["index\tname\tchi_ppm\n"] + [f"{v}\t{k}\t{CHI_PPM[k]}\n" for k, v in LABELS.items()]
    write_text_atomic(truth / "dseg.tsv", "".join(rows))


def write_bids_dataset(out_dir, subjects, phase_units="arbitrary", name=DATASET_NAME, replace_earlier=False):
    """Write simulated acquisitions as a BIDS dataset with ground truth under derivatives/groundtruth.

    The acquisitions are written into a hidden folder inside ``out_dir`` (on its file system, a container's
    bind mount too, so that moving them is a rename) and moved into place only once all of them are, so that an
    error or a stop part-way (Ctrl-C, a scheduler's SIGTERM, out of memory) leaves ``out_dir`` as it was (one
    this call made is removed), not a dataset with some subjects missing or a real dataset with a stray one.

    Parameters
    ----------
    out_dir : str or Path
        Dataset root (created if missing; the subjects' files are overwritten, dataset-level files
        as ``write_dataset_files`` says).
    subjects : iterable of (subject, session, SimulatedGRE)
        Subject label (no ``sub-``), session label (no ``ses-``) or None, and
        the acquisition. A generator keeps one acquisition in memory at a time.
    phase_units : {"arbitrary", "rad"}, default "arbitrary"
        How phase is stored (see ``write_subject``).
    name : str, default ``DATASET_NAME`` ("qsmprep simulated MEGRE")
        Dataset name for dataset_description.json and README.
    replace_earlier : bool, default False
        Remove an earlier simulation's subjects from ``out_dir`` (``remove_earlier_simulation``) once the new
        ones are written, before they are moved in.

    Returns
    -------
    list of the raw NIfTI paths written (MEGRE; T2starw for one echo).

    Raises DataError, before writing anything, when a dataset file it would read cannot be read
    (``check_dataset_files``).
    """
    out_dir = Path(out_dir)
    check_dataset_files(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".simulating-", dir=out_dir))
    try:
        written, labels = [], []
        for subject, session, gre in subjects:
            written += write_subject(staging, subject, session, gre, phase_units)
            labels.append(subject)
            del gre  # written: free it before the next acquisition is simulated, not after
        replaced = remove_earlier_simulation(out_dir) if replace_earlier else 0
        if replaced:
            log.info("Replacing the %d subject(s) of the earlier simulation in %s", replaced, out_dir)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):  # renames on one file system
            target = out_dir / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        write_dataset_files(out_dir, labels, phase_units, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return [out_dir / path.relative_to(staging) for path in written]
