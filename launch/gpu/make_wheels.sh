#!/usr/bin/env bash
# Fill .whl/ (repository root, git-ignored) with Python 3.12 x86-64 wheels of what a GPU machine that
# already has torch, torchvision, triton, numba, numpy, pytest lacks (deepspeed, webdataset, zarr and
# their pure-Python dependencies), plus this project's own wheel: `diet_engine` is a package-dir
# mapping, not a source folder, so the project must be pip-installed there.
# Usage (project root): bash launch/gpu/make_wheels.sh   (PYTHON= a python with torch, default python3)
# On the GPU machine (no network):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD && python3 -m diet_engine.launch.cli bench gpu
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-common-dir)/info/exclude
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
py=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  webdataset braceexpand zarr numcodecs donfig google-crc32c msgspec \
  hjson pydantic pydantic-core annotated-types typing-inspection "$@"
if ! ls .whl/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
# this project's own wheel (pure Python), rebuilt every time so it matches the working tree
rm -f .whl/diet_engine-*.whl
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$root"
# one version of each package: keep the newest
ls .whl | sed -E 's/-[0-9].*//' | sort | uniq -d | while read -r dup; do
  ls -t .whl/"$dup"-* | tail -n +2 | xargs -r rm -f
done
du -sh .whl
