"""Static checks of the Dockerfile, the Apptainer definition and the HPC recipes.

Docker cannot build in CI; these tests catch what a build would: missing
COPY sources, a wrong entry point, an unknown variant, broken shell or YAML.
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _instructions(text):
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return _instructions((ROOT / "Dockerfile").read_text())


def test_dockerfile_is_multistage_with_known_instructions(dockerfile):
    known = {"FROM", "ARG", "RUN", "COPY", "ENV", "LABEL", "USER", "WORKDIR", "ENTRYPOINT", "CMD"}
    assert {k for k, _ in dockerfile} <= known
    stages = [a for k, a in dockerfile if k == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build")
    copied_from_build = [a for k, a in dockerfile if k == "COPY" and a.startswith("--from=build")]
    assert copied_from_build, "the runtime stage must copy the environment built in the first stage"


def test_dockerfile_copy_sources_exist(dockerfile):
    for keyword, args in dockerfile:
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"


def test_dockerfile_entrypoint_variants_and_non_root(dockerfile):
    entry = [a for k, a in dockerfile if k == "ENTRYPOINT"]
    assert entry == ['["qsmprep"]']
    run_torch = " ".join(a for k, a in dockerfile if k == "RUN" and "torch" in a)
    assert "cpu)" in run_torch and "cuda)" in run_torch and "exit 1" in run_torch
    assert ("USER", "qsmprep") in dockerfile
    env = " ".join(a for k, a in dockerfile if k == "ENV")
    assert "HOME=/tmp" in env  # any UID (docker run -u) gets a writable HOME


def test_dockerfile_torch_pin_matches_project():
    text = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"TORCH_VERSION=(\S+)", text).group(1)
    assert f"torch=={pinned}" in ci


def test_apptainer_definition_runs_qsmprep():
    text = (ROOT / "qsmprep.def").read_text()
    assert re.search(r"^Bootstrap: docker", text, re.M)
    assert 'exec qsmprep "$@"' in text


def test_hpc_recipes_parse():
    script = ROOT / "workflows" / "slurm_array.sh"
    bash = shutil.which("bash")
    subprocess.run([bash, "-n", str(script)], check=True)
    text = script.read_text()
    assert "--participant-label" in text and "apptainer run" in text
    for name in ("nipype_slurm.yml", "nipype_multiproc.yml"):
        config = yaml.safe_load((ROOT / "workflows" / name).read_text())
        assert config["plugin"] in {"SLURMGraph", "SLURM", "MultiProc"}
        assert isinstance(config["plugin_args"], dict)


def test_slurm_array_script_refuses_to_run_outside_an_array(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "workflows" / "slurm_array.sh")],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "sbatch --array" in result.stderr


def test_slurm_array_script_cleans_up_and_keeps_qsmprep_exit_code_on_failure(tmp_path):
    """A failed run must still remove the node-local work directory and report qsmprep's exit code."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apptainer").write_text("#!/bin/sh\nexit 70\n")
    (fake_bin / "apptainer").chmod(0o755)
    (tmp_path / "participants.txt").write_text("01\n")
    work = tmp_path / "scratch"
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "WORK_DIR": str(work),
           "OUTPUT_DIR": str(tmp_path / "out"), "BIDS_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "workflows" / "slurm_array.sh")],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 70, result.stderr
    assert not work.exists()
