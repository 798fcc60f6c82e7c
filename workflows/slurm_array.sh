#!/usr/bin/env bash
# SLURM array job: one participant per task, qsmprep in Apptainer/Singularity.
# Edit the paths and resources, then:   sbatch --array=1-$(( $(wc -l < participants.txt) )) workflows/slurm_array.sh
# participants.txt holds one label per line (without "sub-"), e.g. made with:
#   tail -n +2 "$BIDS_DIR/participants.tsv" | cut -f1 | sed 's/^sub-//' > participants.txt
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/qsmprep_%A_%a.out
# For the deep inversion on a GPU partition, add e.g.:  #SBATCH --gres=gpu:1  and use --nv below.
set -euo pipefail

BIDS_DIR=${BIDS_DIR:-/path/to/bids}
OUTPUT_DIR=${OUTPUT_DIR:-/path/to/derivatives/qsmprep}
SIF=${SIF:-/path/to/qsmprep.sif}
PARTICIPANTS=${PARTICIPANTS:-participants.txt}
# Node-local scratch keeps the many small Nipype files off the shared file system.
WORK_DIR=${WORK_DIR:-${TMPDIR:-/tmp}/qsmprep_work_${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}}

label=$(sed -n "${SLURM_ARRAY_TASK_ID:?run this with sbatch --array}p" "$PARTICIPANTS")
[ -n "$label" ] || { echo "no participant on line ${SLURM_ARRAY_TASK_ID} of $PARTICIPANTS" >&2; exit 64; }
mkdir -p "$OUTPUT_DIR" "$WORK_DIR" logs

# `|| status=$?` keeps set -e from exiting before the clean-up on a failed run.
status=0
apptainer run --cleanenv \
  -B "$BIDS_DIR:/data/bids:ro" -B "$OUTPUT_DIR:/data/out" -B "$WORK_DIR:/work" \
  "$SIF" /data/bids /data/out participant \
  --participant-label "$label" -w /work \
  --nprocs "${SLURM_CPUS_PER_TASK:-1}" --omp-nthreads "${SLURM_CPUS_PER_TASK:-1}" \
  --mem "$(( ${SLURM_MEM_PER_NODE:-16384} / 1024 ))" || status=$?
rm -rf "$WORK_DIR"
exit $status
