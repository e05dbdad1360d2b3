#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on the GPU machine.
#
#     benchmarks/gpu_wheels.sh [DIR]        (default DIR: .whl, ignored by git)
#
# The GPU machine has Python 3.12, jax with its CUDA plugin, flax, optax, orbax, chex,
# numpy, scikit-image, matplotlib, tqdm and pillow, and cannot download anything. What
# jaxrepro needs beyond that is TFDS (its reader of the embedded data set), array_record
# (the file format), ml_collections (the configs) and their own small dependencies. They
# are taken at the versions of uv.lock, for CPython 3.12 on manylinux x86-64; a package
# published as source only (promise) is built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
# The locked packages the GPU machine lacks (tensorflow-datasets and what it needs that
# is not there; README "GPU").
CARRY=(tensorflow-datasets array-record dm-tree immutabledict promise simple-parsing
    docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml
    ml-collections importlib-resources)
mkdir -p "$dir"
pins=$(uv export --frozen --no-hashes --no-emit-project --no-dev | sed -n 's/^\([A-Za-z0-9_.-]*==[^ ;]*\).*/\1/p')
for name in "${CARRY[@]}"; do
    pin=$(grep -i "^${name}==" <<<"$pins") || { echo "not in uv.lock: $name" >&2; exit 2; }
    if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$dir" "$pin" 2>/dev/null; then
        python3 -m pip wheel -q --no-deps -w "$dir" "$pin"  # source only: pure Python
    fi
done
ls "$dir"
du -sh "$dir"
# The commit the copy sent to the GPU machine is made from (it travels without .git);
# gpu_check.sh passes it on as $JAXREPRO_SOURCE_COMMIT, for the results' provenance.
{ git rev-parse --short=12 HEAD | tr -d '\n'; git diff --quiet HEAD -- || printf '+dirty'; echo; } >"$dir/COMMIT"
cat "$dir/COMMIT"
