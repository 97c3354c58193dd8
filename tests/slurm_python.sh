#!/bin/bash
# PYTHON for the sbatch scripts in tests/test_slurm.py: the Python on PATH, plus two things a test asks for.
#   TASK_OUTPUT_DIR=DIR  each task of a job array trains into DIR/task_<task id> (users write this in their script)
#   NO_SCONTROL=1        the run finds no scontrol on PATH, as inside a container without Slurm's commands
python=$(command -v python3)
extra=()
if [[ -n ${TASK_OUTPUT_DIR:-} ]]; then
    extra+=("output_dir=$TASK_OUTPUT_DIR/task_$SLURM_ARRAY_TASK_ID")
fi
if [[ -n ${NO_SCONTROL:-} ]]; then
    export PATH=/nonexistent
fi
exec "$python" "$@" "${extra[@]}"
