#!/usr/bin/env bash
# Builds an offline wheelhouse: every wheel flora_mm's stack needs for ONE target, in one folder,
# with a manifest (called by `make wheelhouse`; installed by scripts/install_offline.sh).
# Needs the package index; the target machine needs none.
#
# Target (environment variables, defaults = the environment `make env` builds here):
#   PYTHON                 interpreter of the target's Python version (python3.11); it must run
#                          here, because mmcv's ops are compiled with it
#   TORCH                  the target's torch version (the pin in requirements.txt)
#   TORCHVISION            its torchvision (default: 0.(minor+15).patch, the pairing since torch 2.0)
#   FLORA_MM_CUDA          0 (default): mmcv with CPU kernels; 1: CPU + CUDA kernels
#   TORCH_CUDA_ARCH_LIST   CUDA variant only (as in setup_env.sh; e.g. 9.0 for H100/H200)
#   PLATFORM               wheel platform of the target (manylinux_2_28_x86_64, torch's own floor)
#   TORCH_WHEELS=1         also put torch, torchvision and torch's CUDA runtime wheels in
#   NODE_PACKAGES          a layered wheelhouse for a node whose image already holds most packages:
#                          the node's `python -m pip list --format=freeze` (or one name per
#                          line); only the stack (scripts/wheelhouse_manifest.py STACK) and the
#                          closure's packages the node lacks are collected
#   WHEELHOUSE             output folder (work_dirs/wheelhouse-<py>-<torch>-<variant>)
#   SDISTS                 "name==version ..." of dependencies with no wheel for the target: built
#                          here into wheels first (none needed for the pinned stack today)
#   WHEELHOUSE_BUILD       throwaway build venvs and the cached mmcv wheel
#                          ($FLORA_MM_CACHE/wheelhouse-build, default ~/.cache/flora_mm/...)
#
# Steps: 1. a build venv with exactly that torch; 2. mmcv 2.0.1 compiled in it against that
# torch (CPU: the C++20 compiler wrapper of setup_env.sh; CUDA: scripts/cuda_toolchain.sh),
# cached per target; 3. the rest of requirements.txt + requirements-test.txt and everything
# they pull, resolved once for the target's Python/platform together with torch==TORCH (so the
# versions agree with that torch), then downloaded as wheels (an sdist-only package is built
# into a wheel with the build venv when named in SDISTS); 4. flora_mm itself as a wheel; 5. manifest.json.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[flora_mm wheelhouse] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
if [ -n "${NODE_PACKAGES:-}" ]; then  # checked (and made absolute) before anything is removed
  [ -f "$NODE_PACKAGES" ] || die "NODE_PACKAGES=$NODE_PACKAGES is not a file (the node's pip list --format=freeze)"
  NODE_PACKAGES="$(cd "$(dirname "$NODE_PACKAGES")" && pwd)/$(basename "$NODE_PACKAGES")"
fi
cd "$root"
t0=$(date +%s)

py="${PYTHON:-python3.11}"
"$py" -c "import sys" >/dev/null 2>&1 || die "PYTHON=$py does not run on this machine (the mmcv ops are compiled with it; a pyenv shim of a version not selected fails here: give its path)"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
pytag="cp${pyver/./}"
pin() { grep -E "^$1==" requirements.txt | head -n1 | cut -d= -f3; }
torch_ver="${TORCH:-$(pin torch)}"
if [ -n "${TORCHVISION:-}" ]; then tv_ver="$TORCHVISION"
else
  IFS=. read -r tmaj tmin tpatch <<<"${torch_ver%%+*}"
  [ "$tmaj" = 2 ] || die "cannot guess torchvision for torch $torch_ver: set TORCHVISION"
  tv_ver="0.$((tmin + 15)).${tpatch:-0}"
fi
case "${FLORA_MM_CUDA:-0}" in
  1|true|yes) variant=cuda ;;
  0|false|no) variant=cpu ;;
  *) die "FLORA_MM_CUDA must be 0 or 1, got '${FLORA_MM_CUDA}'" ;;
esac
cuda_archs=""
[ "$variant" = cuda ] && cuda_archs="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0;10.0;12.0+PTX}"
platform="${PLATFORM:-manylinux_2_28_x86_64}"
mmcv_ver="$(pin mmcv)"
label="$pytag-$torch_ver-$variant"
[ "$variant" = cuda ] && label="$label-sm$(echo "$cuda_archs" | tr -d '.+' | tr ';' '_')"
# a layered wheelhouse's selection files (and default folder) apart from the full one's; the build
# venv and the compiled mmcv are the same for both
flavour="$label${NODE_PACKAGES:+-layered}"
out="${WHEELHOUSE:-$root/work_dirs/wheelhouse-$flavour}"
cache="${FLORA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flora_mm}"
build="${WHEELHOUSE_BUILD:-$cache/wheelhouse-build}"
mkdir -p "$build" "$out"
out="$(cd "$out" && pwd)"
log "target: python $pyver, torch $torch_ver, torchvision $tv_ver, $variant${cuda_archs:+ (archs $cuda_archs)}, $platform -> $out"

# --- 1. build venv with exactly that torch (its wheels kept in $build/torch-<py>-<torch>) -------
bvenv="$build/venv-$label"
bpy="$bvenv/bin/python"
pipq() { "$bpy" -m pip --disable-pip-version-check --no-input "$@"; }
torch_dir="$build/torch-$pytag-$torch_ver"
if ! "$bpy" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_ver%%+*}')" 2>/dev/null; then
  log "build venv $bvenv"
  rm -rf "$bvenv"
  "$py" -m venv "$bvenv"
  pipq install -q "pip==25.3"
  mkdir -p "$torch_dir"
  pipq download -q --only-binary=:all: -d "$torch_dir" "torch==$torch_ver" "torchvision==$tv_ver" >&2
  pipq install -q --no-index --find-links "$torch_dir" "torch==$torch_ver" "torchvision==$tv_ver" >&2
  pipq install -q -r requirements-build.txt >&2
fi
read -r torch_full torch_cuda cxx11_abi < <("$bpy" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", int(torch._C._GLIBCXX_USE_CXX11_ABI))')
log "build venv torch $torch_full (CUDA $torch_cuda, cxx11 abi $cxx11_abi)"

# --- 2. mmcv compiled against that torch, cached per target -------------------------------------
mmcv_dir="$build/mmcv-$label"
stamp="$mmcv_dir/built-against"
want_stamp="torch=$torch_full cuda=$torch_cuda variant=$variant archs=$cuda_archs"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] && ls "$mmcv_dir"/mmcv-"$mmcv_ver"-*.whl >/dev/null 2>&1; then
  log "reusing $(ls "$mmcv_dir"/mmcv-*.whl) ($want_stamp)"
else
  rm -rf "$mmcv_dir"; mkdir -p "$mmcv_dir"
  # shellcheck source=cxx20_wrapper.sh
  source "$root/scripts/cxx20_wrapper.sh"
  wrap="$bvenv/bin/flora-cxx"
  write_cxx20_wrapper "$wrap" '"${FLORA_MM_REAL_CXX:-g++}"'
  if [ "$variant" = cuda ]; then
    case "$torch_cuda" in
      13.0*) ;;
      *) die "torch $torch_full is a CUDA $torch_cuda build; scripts/cuda_toolchain.sh and requirements-cuda.txt provide nvcc 13.0 only" ;;
    esac
    # shellcheck source=cuda_toolchain.sh
    source "$root/scripts/cuda_toolchain.sh"
    setup_cuda_toolchain "$bvenv" "$bpy" "$cuda_archs"
  else
    export FORCE_CUDA=0
  fi
  mstart=$(date +%s)
  log "compiling mmcv $mmcv_ver ($variant ops) against torch $torch_full; MAX_JOBS=${MAX_JOBS:-$(nproc)}"
  PATH="$bvenv/bin:$PATH" CXX="$wrap" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    pipq wheel --no-build-isolation --no-deps --no-binary mmcv --no-cache-dir \
      -w "$mmcv_dir" "mmcv==$mmcv_ver" >&2
  echo "$want_stamp" >"$stamp"
  log "mmcv compiled in $(( $(date +%s) - mstart )) s: $(ls "$mmcv_dir"/mmcv-*.whl)"
fi
mmcv_whl="$(ls "$mmcv_dir"/mmcv-"$mmcv_ver"-*.whl | head -n1)"
if [ "$variant" = cuda ]; then
  # the wheel must carry the detection ops' CUDA kernels (read from its symbols, no GPU needed)
  kdir="$(mktemp -d)"
  "$bpy" -m zipfile -e "$mmcv_whl" "$kdir" >/dev/null
  (cd "$root" && "$bpy" - "$kdir" <<'PY' >&2
import glob, importlib.util, sys
spec = importlib.util.spec_from_file_location('cuda_ops', 'flora_mm/apis/cuda_ops.py')
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(m.check_mmcv_cuda_kernels(glob.glob(sys.argv[1] + '/mmcv/_ext*.so')[0]))
PY
  )
  rm -rf "$kdir"
fi

# --- 3. everything else, for the target's Python and platform ----------------------------------
rm -f "$out"/*.whl "$out"/manifest.json
cp "$mmcv_whl" "$out/"
reqs="$build/requirements-$flavour.txt"
{
  grep -vE '^(torch|torchvision|mmcv)==' requirements.txt
  grep -vE '^(torch|torchvision)==' requirements-test.txt
} | sed -e 's/#.*//' -e '/^[[:space:]]*$/d' >"$reqs"
# the install list of the target: the pins above, mmcv, flora_mm (its wheel declares no dependency)
# pip does not widen a manylinux_2_N tag to older glibc versions by itself: list them all
plat_arch="${platform#manylinux_2_*_}"; plat_glibc="${platform#manylinux_2_}"; plat_glibc="${plat_glibc%%_*}"
target=(--python-version "$pyver" --implementation cp --abi "$pytag" --only-binary=:all:)
for g in $(seq "$plat_glibc" -1 5); do target+=(--platform "manylinux_2_${g}_$plat_arch"); done
target+=(--platform "manylinux2014_$plat_arch" --platform "manylinux2010_$plat_arch"
         --platform "manylinux1_$plat_arch" --platform "linux_$plat_arch")  # linux_*: mmcv's own
# a dependency without a wheel on the index: SDISTS="name==version ..." builds it here first
links=(--find-links "$mmcv_dir")
if [ -n "${SDISTS:-}" ]; then
  sdist_dir="$build/sdist-wheels-$label"; mkdir -p "$sdist_dir"
  # shellcheck disable=SC2086
  pipq wheel -q --no-deps -w "$sdist_dir" $SDISTS >&2
  links+=(--find-links "$sdist_dir")
fi
report="$build/report-$flavour.json"
log "resolving the stack for $pytag/$platform together with torch==$torch_ver"
pipq install -q --dry-run --ignore-installed --target "$build/dry-$flavour" "${target[@]}" \
  "${links[@]}" --report "$report" \
  -r "$reqs" "mmcv==$mmcv_ver" "torch==$torch_ver" "torchvision==$tv_ver" >&2
# the closure minus torch's own wheels (unless TORCH_WHEELS=1), mmcv (compiled above) and, for a
# layered wheelhouse, what the node's image already holds (scripts/wheelhouse_manifest.py)
closure="$build/closure-$flavour.json"
sel=(select "$report" "$build/wheels-$flavour.txt" "$closure")
[ "${TORCH_WHEELS:-0}" = 1 ] && sel+=(--torch-wheels)
[ -n "${NODE_PACKAGES:-}" ] && sel+=(--node-packages "$NODE_PACKAGES")
"$bpy" "$root/scripts/wheelhouse_manifest.py" "${sel[@]}"
log "downloading $(wc -l <"$build/wheels-$flavour.txt") wheels"
pipq download -q --no-deps "${target[@]}" "${links[@]}" -d "$out" -r "$build/wheels-$flavour.txt" >&2

# --- 4. flora_mm itself --------------------------------------------------------------------------
fdir="$(mktemp -d)"
cp -r pyproject.toml README.md flora_mm "$fdir/"   # a clean copy: no build/ or egg-info in the tree
pipq wheel -q --no-deps --no-build-isolation -w "$out" "$fdir" >&2
rm -rf "$fdir"

# --- 5. manifest ---------------------------------------------------------------------------------
fields="$("$bpy" - "$pyver" "$platform" "$variant" "$torch_full" "$torch_cuda" "$cxx11_abi" "$tv_ver" \
  "$cuda_archs" "${TORCH_WHEELS:-0}" "$mmcv_ver" <<'PY'
import json, sys
pyver, plat, variant, torch_full, torch_cuda, abi, tv, archs, torch_wheels, mmcv = sys.argv[1:]
print(json.dumps({
    'python': pyver, 'platform': plat, 'variant': variant, 'torch': torch_full.split('+')[0],
    'torch_build': torch_full, 'torch_cuda': None if torch_cuda == 'none' else torch_cuda,
    'torch_cxx11_abi': int(abi), 'torchvision': tv, 'cuda_arch_list': archs or None,
    'torch_wheels_included': torch_wheels == '1', 'mmcv': mmcv}))
PY
)"
"$bpy" "$root/scripts/wheelhouse_manifest.py" write "$out" --requirements "$reqs" \
  --closure-json "$closure" --fields "$fields"
log "done in $(( $(date +%s) - t0 )) s: $out (install there with scripts/install_offline.sh $out)"
echo "$out"
