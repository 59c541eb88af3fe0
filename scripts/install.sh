#!/usr/bin/env bash
# Install EvoMerge into the active Python environment, with the torch build
# that fits this machine: CUDA where `nvidia-smi` lists a GPU, CPU elsewhere.
#
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh dev      # the package and the test dependencies
#
# EVOMERGE_TORCH_VERSION overrides the torch version (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_version=${EVOMERGE_TORCH_VERSION:-2.13.0}
extras=${1:-}

installed=$("$python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "${installed%%+*}" == "$torch_version" ]]; then
    echo "torch $installed is already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # PyPI's Linux wheels of torch are the CUDA builds.
    "$python" -m pip install "torch==$torch_version"
elif "$python" -m pip install --no-index --no-deps "torch==$torch_version" 2>/dev/null; then
    # A CPU wheel from a local wheel folder that pip is configured to search.
    echo "installed torch $torch_version from a local wheel"
else
    "$python" -m pip install "torch==$torch_version" \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi

if [[ -n "$extras" ]]; then
    "$python" -m pip install -e ".[$extras]"
else
    "$python" -m pip install -e .
fi
