#!/usr/bin/env bash
# Builds (or reuses) flora_mm's virtual environment and prints its interpreter path on the last
# line of stdout. Called by `make env`; every other make target goes through it.
#
# - Two variants. `cpu`: mmcv's ops with CPU kernels only (the default where no NVIDIA driver is
#   found, so CI is unchanged). `cuda`: mmcv's ops with CPU and CUDA kernels, compiled with
#   NVIDIA's compiler wheels matching torch's CUDA (scripts/cuda_toolchain.sh); chosen by itself
#   on a machine with an NVIDIA driver, or forced with FLORA_MM_CUDA=1 (FLORA_MM_CUDA=0 forces
#   cpu). The CUDA variant is a separate cached environment, never a change of the CPU one.
# - The environment lives OUTSIDE the checkout, in a folder keyed by a hash of the requirement
#   files, the Python version, the variant (and for cuda the arch list) and ENV_REVISION below,
#   so fresh clones (CI) reuse it: $FLORA_MM_ENV overrides the folder, $FLORA_MM_CACHE the
#   parent (default ~/.cache/flora_mm).
# - Order: torch first, then mmcv 2.0.1 compiled from source against that torch, then the rest,
#   then flora_mm itself in editable mode.
# - A build is finished only when the marker file `.flora_mm_complete` exists; it is written last,
#   after the compiled ops imported. An interrupted build is wiped and redone.
set -euo pipefail

# Bump when the build steps below change what ends up in the environment.
ENV_REVISION=2

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${FLORA_MM_PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
log() { echo "[flora_mm env] $*" >&2; }

has_nvidia_driver() {
  [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
}
case "${FLORA_MM_CUDA:-auto}" in
  1|true|yes) variant=cuda ;;
  0|false|no) variant=cpu ;;
  auto) if has_nvidia_driver; then variant=cuda; else variant=cpu; fi ;;
  *) log "FLORA_MM_CUDA must be 0, 1 or unset (auto), got '${FLORA_MM_CUDA}'"; exit 2 ;;
esac
# Architectures for mmcv's CUDA kernels. CUDA 13 compiles for sm_75 and newer; the default covers
# A100 (8.0), consumer Ampere (8.6), Ada (8.9), H100/H200 (9.0), Blackwell (10.0, 12.0) and PTX
# for what comes later. Every arch adds about the device-compile share of the build again.
cuda_archs="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0;10.0;12.0+PTX}"

key_input() {
  cat requirements.txt requirements-test.txt requirements-build.txt
  "$py" -c 'import sys; print(sys.version)'
  echo "revision=$ENV_REVISION variant=$variant"
  if [ "$variant" = cuda ]; then cat requirements-cuda.txt scripts/cuda_toolchain.sh; echo "archs=$cuda_archs"; fi
}
key="$(key_input | sha256sum | cut -c1-16)"
cache="${FLORA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flora_mm}"
suffix=""; [ "$variant" = cuda ] && suffix="-cuda"
env_dir="${FLORA_MM_ENV:-$cache/venv-$key$suffix}"
marker="$env_dir/.flora_mm_complete"
vpy="$env_dir/bin/python"

editable_ok() {
  # the environment is shared by clones: make sure it imports flora_mm from THIS checkout
  "$vpy" - "$root" <<'PY' 2>/dev/null
import os, sys, importlib.util
spec = importlib.util.find_spec('flora_mm')
sys.exit(0 if spec and os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)
PY
}

if [ -f "$marker" ]; then
  if ! editable_ok; then
    log "pointing the cached environment at this checkout ($root)"
    "$vpy" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
  fi
  echo "$vpy"
  exit 0
fi

mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9
if [ -f "$marker" ]; then  # another process finished it while we waited
  echo "$vpy"; exit 0
fi

start=$(date +%s)
log "building the $variant environment $env_dir (first run: the mmcv ops compile takes ~15 min on 2 cores for cpu, ~26 min plus ~11 min per extra CUDA arch for cuda)"
rm -rf "$env_dir"
"$py" -m venv "$env_dir"
pipi() { "$vpy" -m pip install --disable-pip-version-check --no-input "$@" >&2; }
pipi -q --upgrade "pip==25.3"

# 1. torch and torchvision, pinned in requirements.txt; then the build tools (torch pulls the
#    newest setuptools, without pkg_resources, which mmcv's setup.py needs: the pin goes in after)
pin() { grep -E "^$1==" requirements.txt; }
pipi -q "$(pin torch)" "$(pin torchvision)"
pipi -q -r requirements-build.txt

# 2. mmcv from source with its ops, against that torch.
#    Its setup.py hard-codes -std=c++14 while torch's headers need C++20: a compiler wrapper
#    rewrites the flag. No build isolation, so it compiles against the torch installed above.
# write_cxx20_wrapper (scripts/cxx20_wrapper.sh, shared with scripts/wheelhouse.sh)
# shellcheck source=cxx20_wrapper.sh
source "$root/scripts/cxx20_wrapper.sh"
wrap="$env_dir/bin/flora-cxx"
write_cxx20_wrapper "$wrap" '"${FLORA_MM_REAL_CXX:-g++}"'
if [ "$variant" = cuda ]; then
  # sets CUDA_HOME, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST and MMCV_CUDA_ARGS (every CUDA-only
  # patch and flag lives in that one file)
  # shellcheck source=cuda_toolchain.sh
  source "$root/scripts/cuda_toolchain.sh"
  setup_cuda_toolchain "$env_dir" "$vpy" "$cuda_archs"
else
  export FORCE_CUDA=0
fi
mmcv_start=$(date +%s)
# pip caches wheels it builds from an sdist and reuses them even with --no-binary: the cuda
# variant neither reads nor writes that cache, so neither variant can pick up the other's mmcv.
nocache=(); [ "$variant" = cuda ] && nocache=(--no-cache-dir)
PATH="$env_dir/bin:$PATH" CXX="$wrap" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  pipi --no-build-isolation --no-binary mmcv "${nocache[@]}" "$(pin mmcv)"
log "mmcv ($variant ops) compiled in $(( $(date +%s) - mmcv_start )) s"

# 3. the rest, then flora_mm in editable mode (torch and mmcv are already satisfied).
pipi -q -r requirements.txt -r requirements-test.txt
pipi -q --no-deps --no-build-isolation -e "$root"

# 4. fail loudly unless the compiled ops and every OpenMMLab package import
"$vpy" "$root/scripts/check_env.py" >&2
if [ "$variant" = cuda ]; then
  # the extension must hold CUDA kernels for the detection ops, or the variant is not what it says
  "$vpy" "$root/scripts/check_mmcv_cuda.py" >&2
fi
touch "$marker"
log "environment ready in $(( $(date +%s) - start )) s"
echo "$vpy"
