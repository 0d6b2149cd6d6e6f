# Sourced by scripts/test.sh and scripts/quickstart.sh: create (or reuse) the venv and install vpfast.
#
#   setup_venv EXTRAS    EXTRAS like "test,clip", or "" for none
#
# The venv is $VENV (default .venv), made with $PYTHON (default python3); afterwards $PY is its
# python and its bin/ leads PATH. The extension gets CUDA kernels (for TORCH_CUDA_ARCH_LIST,
# default 8.0;9.0) when $CUDA_HOME/bin/nvcc exists (default /usr/local/cuda), else it is CPU-only.
#
# Packages are installed by uv (pip-installed into the venv first): it unpacks wheels in parallel and,
# with its cache warm, links torch's 5 GB from there, 1 s instead of pip's 48 s on 2 cores. uv reads
# the UV_* variables (UV_INDEX_URL, UV_EXTRA_INDEX_URL, ...), not pip's configuration;
# VPFAST_INSTALLER=pip installs with pip instead, as happens (with a message) when uv cannot be
# installed. vpfast itself is always rebuilt (--reinstall-package vpfast), so a changed csrc/ is
# never served from uv's cache. Nothing is byte-compiled at install time; one import of vpfast and
# its model libraries byte-compiles what they use, even where PYTHONDONTWRITEBYTECODE is set (without
# those files, every later start would recompile them: 11 s instead of 3 s for `vpfast info` on 2 cores).

setup_venv() {
  local extras="$1"
  VENV="${VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  local bin
  bin="$(cd "$VENV/bin" && pwd)"
  export PATH="$bin:$PATH"
  local installer="${VPFAST_INSTALLER:-uv}" install rebuild
  case "$installer" in
    uv | pip) ;;
    *) echo "setup_venv: VPFAST_INSTALLER must be uv or pip, got '$installer'" >&2; return 1 ;;
  esac
  if [ "$installer" = uv ] && [ ! -x "$bin/uv" ] && ! "$PY" -m pip install --quiet uv; then
    echo "setup_venv: uv could not be installed from the package index, installing with pip instead" \
         "(slower; VPFAST_INSTALLER=pip chooses pip from the start)" >&2
    installer=pip
  fi
  if [ "$installer" = uv ]; then
    install=("$bin/uv" pip install --quiet --python "$PY") rebuild=(--reinstall-package vpfast)
  else
    install=("$PY" -m pip install --quiet --no-compile) rebuild=()
  fi
  "${install[@]}" "torch==2.14.1" "torchvision==0.29.1" "setuptools>=64" wheel ninja
  local cuda_home="${CUDA_HOME:-/usr/local/cuda}"
  if [ -x "$cuda_home/bin/nvcc" ]; then
    export CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  else
    echo "setup_venv: no nvcc under $cuda_home, building vpfast without CUDA kernels" >&2
  fi
  "${install[@]}" "${rebuild[@]}" --no-build-isolation -e ".${extras:+[$extras]}"
  PYTHONDONTWRITEBYTECODE= "$PY" -c "import importlib, importlib.util
for name in ('vpfast.cli', 'vpfast.demo', 'vpfast.train.loop', 'timm', 'open_clip'):
    if importlib.util.find_spec(name.split('.')[0]):
        importlib.import_module(name)"
}
