#!/usr/bin/env bash
# The GPU check in one command (README "GPU"): run to run, without the determinism flags,
# GPU against CPU, throughput, data-parallel invariant mode, for both models.
#
#     benchmarks/gpu_check.sh OUT [--dry-run] [options of python -m jaxrepro.analysis.gpucheck]
#
# Runs from a copy of this tree with the machine's own python3 (or $PYTHON), which must
# have jax, flax, optax, orbax-checkpoint, chex, numpy, scikit-image and matplotlib. If
# TFDS, array_record or ml_collections are missing, it installs the wheels that
# benchmarks/gpu_wheels.sh put in .whl/ (into a folder of their own, on PYTHONPATH),
# generates the embedded data set, and writes gpu_check.json, gpu_check.md, bench.json,
# bench.md and logs.tar.gz to OUT. `--dry-run` runs it all on the CPU, to test it.
# Exit status: 0 every step ran; 1 a step failed (the table says which); 2 it could
# not start (no GPU without --dry-run, missing packages, bad options).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: benchmarks/gpu_check.sh OUT [--dry-run] [options]" >&2
    exit 2
fi
out=$1
shift
py=${PYTHON:-python3}
wheels=${JAXREPRO_WHEELS:-.whl}
if ! "$py" -c "import tensorflow_datasets, array_record, ml_collections" 2>/dev/null; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: TFDS, array_record or ml_collections are missing and $wheels/ holds" \
            "no wheels; run benchmarks/gpu_wheels.sh where pip can download" >&2
        exit 2
    fi
    site=$(mktemp -d "${TMPDIR:-/tmp}/jaxrepro-site.XXXXXX")
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$wheels"/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${JAXREPRO_SOURCE_COMMIT:-}" ] && [ -f "$wheels/COMMIT" ]; then
    JAXREPRO_SOURCE_COMMIT=$(cat "$wheels/COMMIT")
    export JAXREPRO_SOURCE_COMMIT
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # jaxrepro from this tree
export PYTHONUNBUFFERED=1
exec "$py" -m jaxrepro.analysis.gpucheck "$out" "$@"
