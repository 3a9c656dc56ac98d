#!/usr/bin/env bash
# Submit a recipe to a Ray cluster as a Ray job, after checking what would be uploaded.
#
#   RAY_ADDRESS=http://HEAD:8265 cluster/ray/submit.sh RECIPE [--set a.b=v ...]
#   RAY_SUBMIT_ARGS='--no-wait --runtime-env-json {"env_vars":{"X":"1"}}' cluster/ray/submit.sh ...
#
# The working directory is the repository root; .gitignore and .rayignore decide what is shipped
# (run outputs, checkpoints, MLflow stores, caches, .venv and .git are not). The pre-flight check
# fails, instead of uploading, when the package would exceed Ray's limit (512 MiB) or
# POLYSHIFT_MAX_UPLOAD_MIB.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 RECIPE [run.py options]" >&2
    exit 2
fi
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m launcher.ray_package .
# shellcheck disable=SC2086  # RAY_SUBMIT_ARGS is a list of options on purpose
exec ray job submit --working-dir . ${RAY_SUBMIT_ARGS:-} -- python launcher/run.py "$@"
