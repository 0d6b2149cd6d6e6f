#!/usr/bin/env bash
# Assemble a CUDA 12.4 toolkit (enough to build vpfast's extension) in DEST, without root and without
# touching the system's apt settings:  bash scripts/cuda12_toolchain.sh [DEST]   (default build/cuda12)
#
# NVIDIA's PyPI wheels hold only ptxas, libnvvm and headers (no nvcc driver, cicc, cudafe++, fatbinary,
# nvlink), so those come from Debian's non-free nvidia-cuda-toolkit 12.4.131 (trixie), fetched with a
# private apt configuration and unpacked with dpkg-deb -x; headers, libdevice and libcudart come from
# nvidia-cuda-{runtime,cccl,nvcc}-cu12. Prints DEST on success; use it as CUDA12_HOME for
# scripts/build_wheels.py cu128. nvcc 12.4 builds sm_80/sm_90 and PTX (it cannot emit sm_100/sm_120).
set -euo pipefail
dest="$(mkdir -p "${1:-build/cuda12}" && cd "${1:-build/cuda12}" && pwd)"
if [ -x "$dest/bin/nvcc" ]; then echo "$dest"; exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main contrib non-free" > "$work/apt/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download "nvidia-cuda-toolkit=12.4.131~12.4.1-2" >&2)
dpkg-deb -x "$work"/nvidia-cuda-toolkit_*.deb "$work/deb"

python3 -m pip download -q --no-deps --only-binary=:all: --dest "$work/wheels" \
  nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.4.127.post1 nvidia-cuda-nvcc-cu12==12.4.131 >&2
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/pypi"; done
pypi="$work/pypi/nvidia"

staging="$dest.partial"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/nvvm/bin" "$staging/include" "$staging/lib64"
cp "$work/deb/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$staging/bin/"
cp -r "$work/deb/usr/lib/nvidia-cuda-toolkit/bin/crt" "$staging/bin/"
cp "$work"/deb/usr/bin/{cudafe++,fatbinary,nvlink,ptxas,bin2c,nvprune,cuobjdump} "$staging/bin/"
cp "$work/deb/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$staging/nvvm/bin/"
cp -r "$pypi/cuda_nvcc/nvvm/libdevice" "$staging/nvvm/"
cp -r "$pypi"/cuda_runtime/include/. "$pypi"/cuda_cccl/include/. "$pypi"/cuda_nvcc/include/. "$staging/include/"
cp "$pypi"/cuda_runtime/lib/libcudart.so.12 "$staging/lib64/"
ln -s libcudart.so.12 "$staging/lib64/libcudart.so"
chmod +x "$staging"/bin/* "$staging/nvvm/bin/cicc"
cat > "$staging/bin/nvcc.profile" <<'PROFILE'
TOP                = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH               += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES           += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES          =+ $(_SPACE_) "-L$(TOP)/lib64"
PROFILE
"$staging/bin/nvcc" --version >&2
rm -rf "$dest"
mv "$staging" "$dest"
echo "$dest"
