#!/usr/bin/env bash
# Run HERE (a machine with pip and the MNIST files), once, before a GPU check: puts what
# the lent GPU machine lacks into two folders of the checkout that git ignores and the
# device tool carries (`carry: [".whl", ".gpudata"]`).
#
#   .whl/      wheels for the GPU machine's Python 3.12 of the p2pfl dependencies its image
#              lacks (pydantic, cryptography, tomli-w, ...; torch, numpy, scipy, networkx,
#              msgpack and pytest are there), at the versions installed here
#   .gpudata/  the four MNIST files (12 MB; nothing can be fetched there)
#
# Then, on the GPU machine, one call: `bash benchmarks/gpu_check.sh` (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
data=${P2PFL_DATA_DIR:-$HOME/.cache/p2pfl/data}
for dir in .whl .gpudata; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
version() {
    "$python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null \
        || { echo "error: $1 is not installed for $python: run this in the project's virtual environment" >&2; exit 2; }
}
wanted=()
for dist in pydantic pydantic_core annotated-types typing-inspection typing_extensions tomli-w cryptography cffi pycparser; do
    wanted+=("$dist==$(version "$dist")")
done
rm -rf .whl && mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${wanted[@]}"
if [ ! -f "$data/mnist/train-images-idx3-ubyte.gz" ]; then
    echo "error: $data/mnist has no MNIST files: fetch them first (p2pfl sim examples/dpsgd_mnist_ba64.toml does)" >&2
    exit 2
fi
rm -rf .gpudata && mkdir -p .gpudata/mnist
cp "$data"/mnist/*-ubyte.gz .gpudata/mnist/
du -sh .whl .gpudata
