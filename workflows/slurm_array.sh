#!/usr/bin/env bash
# SLURM array job: one participant (or one session of one) per task, qsmprep in Apptainer/Singularity.
# Edit the paths and resources, then:   sbatch --array=1-$(( $(wc -l < participants.txt) )) workflows/slurm_array.sh
# participants.txt holds one label per line (without "sub-"), e.g. made with:
#   tail -n +2 "$BIDS_DIR/participants.tsv" | cut -f1 | tr -d '\r' | sed 's/^sub-//' > participants.txt
# or, for a task per session, a subject label and a session label (without "ses-") per line, e.g. "01 pre".
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/qsmprep_%A_%a.out
# For the deep inversion on a GPU partition, add e.g.:  #SBATCH --gres=gpu:1  and GPU=1 (apptainer run --nv).
set -euo pipefail

BIDS_DIR=${BIDS_DIR:-/path/to/bids}
OUTPUT_DIR=${OUTPUT_DIR:-/path/to/derivatives/qsmprep}
SIF=${SIF:-/path/to/qsmprep.sif}
PARTICIPANTS=${PARTICIPANTS:-participants.txt}
# Node-local scratch keeps the many small Nipype files off the shared file system.
WORK_DIR=${WORK_DIR:-${TMPDIR:-/tmp}/qsmprep_work_${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}}

task=${SLURM_ARRAY_TASK_ID:?run this with sbatch --array}
read -r label session _ < <(sed -n "${task}p" "$PARTICIPANTS") || true
[ -n "${label:-}" ] || { echo "no participant on line ${task} of $PARTICIPANTS" >&2; exit 64; }
session_args=()
[ -n "${session:-}" ] && session_args=(--session-label "$session")

# The work directory goes however the task ends: qsmprep's exit, or SLURM's SIGTERM at the time limit or on scancel.
trap 'rm -rf "$WORK_DIR"' EXIT
trap 'exit 143' TERM INT
mkdir -p "$OUTPUT_DIR" "$WORK_DIR" logs

cpus=${SLURM_CPUS_PER_TASK:-1}
# The task's memory (--mem, or --mem-per-cpu times the CPUs), of which qsmprep's scheduler is given 85 %: the
# nodes' declared mem_gb leave out the main process (pybids, Nipype) and each worker's interpreter.
mem_mb=${SLURM_MEM_PER_NODE:-$(( ${SLURM_MEM_PER_CPU:-4096} * cpus ))}
mem_gb=$(awk -v mb="$mem_mb" 'BEGIN { printf "%.1f", mb * 0.85 / 1024 }')
gpu_args=()
# --cleanenv drops CUDA_VISIBLE_DEVICES: pass on the GPU(s) SLURM gave this task.
[ "${GPU:-0}" = 1 ] && gpu_args=(--nv ${CUDA_VISIBLE_DEVICES:+--env "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"})

# `|| status=$?` keeps set -e from exiting before the exit code is passed on.
status=0
apptainer run --cleanenv ${gpu_args[@]+"${gpu_args[@]}"} \
  -B "$BIDS_DIR:/data/bids:ro" -B "$OUTPUT_DIR:/data/out" -B "$WORK_DIR:/work" \
  "$SIF" /data/bids /data/out participant \
  --participant-label "$label" ${session_args[@]+"${session_args[@]}"} -w /work \
  --nprocs "$cpus" --omp-nthreads "$cpus" --mem "$mem_gb" || status=$?
exit $status
