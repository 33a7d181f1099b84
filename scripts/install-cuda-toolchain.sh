#!/usr/bin/env bash
# Installs nvcc without a GPU and without root, from NVIDIA's PyPI wheels, into
# a project-local, git-ignored folder (.cuda-toolchain/), then prints the path
# of nvcc. Use it as:  export NVCC=$(scripts/install-cuda-toolchain.sh)
#
# All five wheels are pinned: newer cicc/crt wheels emit PTX that the CUDA 13.0
# driver on the GPU machines rejects.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${CELLMORPH_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}"
python="${PYTHON:-python3}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
)
nvcc="$dest/nvidia/cu13/bin/nvcc"
stamp="$dest/.installed"
want="$(printf '%s\n' "${pins[@]}")"
if [ ! -x "$nvcc" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the CUDA 13.0 compiler into $dest" >&2
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --upgrade --target "$dest" "${pins[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
fi
# The wheels keep headers, nvvm and crt in sibling folders; nvcc finds them
# through its own nvcc.profile relative to bin/, which the layout below satisfies.
if ! "$nvcc" --version >/dev/null 2>&1; then
  echo "error: $nvcc does not run" >&2
  exit 1
fi
echo "$nvcc"
