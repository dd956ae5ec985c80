# Sourced by run.sh and run_condition.sh: the Python to use, a run stamp, and the training launcher
# (torchrun with NGPU processes on this machine when NGPU > 1, else a single process).
PY=${PYTHON:-python}
NGPU=${NGPU:-1}
STAMP=$(date +%Y%m%d-%H%M%S)
if [ "$NGPU" -gt 1 ]; then
  TRAIN=(torchrun --standalone --nproc_per_node "$NGPU" train.py)
else
  TRAIN=("$PY" train.py)
fi
# DRY_RUN=1: `run` prints each command (shell-quoted, one a line) instead of running it, and a preset stops
# before the steps that read outputs; tests/test_presets.py parses the lines against the released runs.
run() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
