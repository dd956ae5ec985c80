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
