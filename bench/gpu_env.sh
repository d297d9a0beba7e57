# Sourced by the gpu_*.sh device scripts (run from the repository root): the environment they share, and
# the checks that stop them before any step when they are run somewhere else.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT to a folder for the logs (the device tool sets it)}"
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "$0 needs a CUDA GPU" >&2; exit 2; }
# the device runs the tree uninstalled: sparse_infer.kernels is the top-level kernels/ folder (gitignored link)
ln -sfn ../kernels sparse_infer/kernels
