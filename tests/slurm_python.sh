#!/bin/bash
# PYTHON for the sbatch scripts in tests/test_slurm.py: the interpreter running the tests (DTRAIN_TEST_PYTHON,
# which need not be on PATH: `make test` runs .venv/bin/python), plus two things a test asks for.
#   TASK_OUTPUT_DIR=DIR  each task of a job array trains into DIR/task_<task id> (users write this in their script)
#   NO_SCONTROL=1        the run finds no scontrol on PATH, as inside a container without Slurm's commands
python=${DTRAIN_TEST_PYTHON:?"set by tests/test_slurm.py: the Python that runs the tests"}
extra=()
if [[ -n ${TASK_OUTPUT_DIR:-} ]]; then
    extra+=("output_dir=$TASK_OUTPUT_DIR/task_$SLURM_ARRAY_TASK_ID")
fi
if [[ -n ${NO_SCONTROL:-} ]]; then
    export PATH=/nonexistent
fi
exec "$python" "$@" "${extra[@]}"
