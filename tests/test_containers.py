"""Static checks of the Dockerfile, the Apptainer definition and the HPC recipes.

Docker cannot build in CI; these tests catch what a build would: missing
COPY sources, a wrong entry point, an unknown variant, broken shell or YAML.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
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
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for keyword, args in dockerfile:
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
                assert src.split("/")[0] not in ignored, f".dockerignore drops COPY source {src}"
    assert {".git", "work", "qsmprep-demo", "**/__pycache__"} <= set(ignored)  # no repository, caches or outputs


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
        # not SLURMGraph: it returns once the jobs are submitted, and qsmprep would report a run that has not happened
        assert config["plugin"] in {"SLURM", "MultiProc"}
        assert isinstance(config["plugin_args"], dict)


def test_slurm_array_script_refuses_to_run_outside_an_array(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "workflows" / "slurm_array.sh")],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "sbatch --array" in result.stderr


def _run_array_task(tmp_path, apptainer, participants="01\n", **env):
    """Run workflows/slurm_array.sh as array task 1 of ``participants`` (participants.txt) with a stand-in
    ``apptainer`` script; return the process."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "apptainer").write_text("#!/bin/sh\n" + apptainer)
    (fake_bin / "apptainer").chmod(0o755)
    (tmp_path / "participants.txt").write_text(participants)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "WORK_DIR": str(tmp_path / "scratch"),
           "OUTPUT_DIR": str(tmp_path / "out"), "BIDS_DIR": str(tmp_path), **env}
    return subprocess.Popen(["bash", str(ROOT / "workflows" / "slurm_array.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)


def test_slurm_array_script_passes_the_tasks_resources(tmp_path):
    """--mem-per-cpu was ignored (16 GB passed for an 8 GB task) and the whole allocation was handed on; the GPU
    SLURM gave the task was dropped by --cleanenv."""
    task = _run_array_task(tmp_path, 'echo "$@" > args.txt\n', SLURM_CPUS_PER_TASK="4", SLURM_MEM_PER_CPU="2048",
                           GPU="1", CUDA_VISIBLE_DEVICES="2")
    assert task.wait() == 0, task.stderr.read()
    args = (tmp_path / "args.txt").read_text().split()
    assert args[:4] == ["run", "--cleanenv", "--nv", "--env"] and args[4] == "CUDA_VISIBLE_DEVICES=2"
    assert args[args.index("--nprocs") + 1] == "4" and args[args.index("--mem") + 1] == "6.8"  # 85 % of 8 GB
    task = _run_array_task(tmp_path, 'echo "$@" > args.txt\n', SLURM_MEM_PER_NODE="16384")
    assert task.wait() == 0, task.stderr.read()
    args = (tmp_path / "args.txt").read_text().split()
    assert "--nv" not in args and args[args.index("--mem") + 1] == "13.6"


@pytest.mark.parametrize("line, labels", [("01", ["--participant-label", "01", "-w"]),
                                          ("01 pre", ["--participant-label", "01", "--session-label", "pre", "-w"]),
                                          ("01\tpre", ["--participant-label", "01", "--session-label", "pre", "-w"])])
def test_slurm_array_script_runs_the_participant_or_session_on_its_line(tmp_path, line, labels):
    task = _run_array_task(tmp_path, 'echo "$@" > args.txt\n', participants=f"{line}\n02\n")
    assert task.wait() == 0, task.stderr.read()
    args = (tmp_path / "args.txt").read_text().split()
    assert args[args.index("--participant-label"):][:len(labels)] == labels


def test_slurm_array_script_refuses_a_line_past_the_end(tmp_path):
    task = _run_array_task(tmp_path, 'echo "$@" > args.txt\n', participants="", SLURM_ARRAY_TASK_ID="1")
    assert task.wait() == 64 and "no participant on line 1 of participants.txt" in task.stderr.read()
    assert not (tmp_path / "args.txt").exists()


def test_slurm_array_script_cleans_up_when_slurm_ends_the_task(tmp_path):
    """SIGTERM (time limit, scancel) left the node-local work directory behind."""
    task = _run_array_task(tmp_path, "echo $$ > qsmprep.pid; exec sleep 60\n")
    pid_file = tmp_path / "qsmprep.pid"
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    assert (tmp_path / "scratch").is_dir()
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # SLURM signals every process of the task
    task.terminate()
    assert task.wait(timeout=30) == 143
    assert not (tmp_path / "scratch").exists()


def test_slurm_array_script_cleans_up_and_keeps_qsmprep_exit_code_on_failure(tmp_path):
    """A failed run must still remove the node-local work directory and report qsmprep's exit code."""
    task = _run_array_task(tmp_path, "exit 70\n")
    assert task.wait() == 70, task.stderr.read()
    assert not (tmp_path / "scratch").exists()
