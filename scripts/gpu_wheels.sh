#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before every GPU call: download the wheels the GPU machine lacks into .whl/
# (ignored by git), for its Python 3.12 on x86-64, and record the commit the results will name (.whl/COMMIT). scripts/gpu_check.sh installs them there; name .whl in
# the device call's carry. Only Liger-Kernel is missing there (its providers in the kernel and model
# suites); it needs nothing the machine does not already have (torch, triton).
#
#   bash scripts/gpu_wheels.sh            # liger-kernel==0.8.5, the version of the committed H100 runs
#   LIGER_VERSION=0.9.0 bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# no commit recorded until the wheels are here: a failed download must not leave an earlier run's commit
# for gpu_check.sh to stamp on this run's records
rm -f .whl/COMMIT
rm -f .whl/liger_kernel-*.whl  # one version only: pip refuses two of the same package
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
# the commit the results will name (the GPU machine's copy of the checkout has git metadata of its own)
sha=$(git rev-parse --short=12 HEAD)
# (untracked files count: the device copy carries every file git does not ignore)
[ -z "$(git status --porcelain)" ] || sha="$sha-dirty"
echo "$sha" > .whl/COMMIT
ls -l .whl; echo "commit: $sha"
