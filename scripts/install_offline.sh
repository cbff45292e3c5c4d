#!/usr/bin/env bash
# Installs flora_mm's stack from a wheelhouse (scripts/wheelhouse.sh) into an interpreter whose
# torch is already installed, without any package index and without compiling anything:
#
#   scripts/install_offline.sh WHEELHOUSE [PYTHON]      (or: make env-offline WHEELHOUSE=DIR)
#
# PYTHON: the target interpreter (default: python3 on PATH; a venv's bin/python, or the cluster's
# module/container python). Steps:
#  1. the wheelhouse is checked against its manifest.json: every listed wheel present with its
#     sha256, no unlisted wheel (pip would pick it up from the folder);
#  2. the interpreter is checked against the manifest: Python version, torch's version (the
#     local part after '+' ignored), torch's C++ ABI, and for the cuda variant torch's CUDA
#     version; a mismatch stops here, naming both sides (mmcv's ops were compiled against
#     exactly the manifest's torch);
#  3. pip install --no-index --find-links WHEELHOUSE of the manifest's install list (torchvision
#     too when the interpreter lacks it and the wheelhouse has it); for a layered wheelhouse
#     (built with NODE_PACKAGES=, scripts/wheelhouse_manifest.py) the stack at its pins and what
#     the interpreter lacks of the closure, --no-deps; what it has of the rest is kept; then
#     the wheels built by wheelhouse.sh (mmcv, flora_mm) reinstalled from their files;
#  4. the import + compiled-ops check of setup_env.sh, and for the cuda variant the kernel check
#     of flora_mm/apis/cuda_ops.py (scripts/check_mmcv_cuda.py), plus one op on the GPU if
#     one is visible.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "[flora_mm offline] $*" >&2; }
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 WHEELHOUSE [PYTHON]" >&2; exit 2; }
wh="$(cd "$1" && pwd)" || { log "no wheelhouse folder '$1'"; exit 2; }
py="${2:-python3}"
"$py" -c "import sys" >/dev/null 2>&1 || { log "interpreter '$py' does not run here"; exit 2; }
[ -f "$wh/manifest.json" ] || { log "$wh has no manifest.json (not a wheelhouse from scripts/wheelhouse.sh)"; exit 2; }
start=$(date +%s)

# 1 + 2: the checks (scripts/wheelhouse_manifest.py plan), printing the install list on success
install_list="$("$py" "$here/wheelhouse_manifest.py" plan "$wh")" || exit 1
# the manifest's fields the steps below need: "layered variant", then the wheels built here
{ read -r layered variant; mapfile -t built; } < <("$py" -c '
import json, sys
m = json.load(open(sys.argv[1]))
print(int(bool(m.get("layered"))), m["variant"])
print("\n".join(m.get("built_here") or []))' "$wh/manifest.json" | sed '/^$/d')

# 3. no index, no compiling: wheels only, from the folder. A layered wheelhouse's plan is the
# closure minus what the node keeps, pinned, so nothing is resolved against the index (--no-deps)
mapfile -t pkgs < <(printf '%s\n' "$install_list" | sed '/^$/d')
nodeps=()
[ "$layered" = 1 ] && nodeps=(--no-deps)
pipi() {
  PIP_NO_INDEX=1 "$py" -m pip install --disable-pip-version-check --no-input -q \
    --no-index --find-links "$wh" --only-binary=:all: "$@" >&2
}
if [ "${#pkgs[@]}" -gt 0 ]; then
  pipi ${nodeps[@]+"${nodeps[@]}"} "${pkgs[@]}"
fi
# the wheels built by wheelhouse.sh (mmcv compiled against this torch, flora_mm), from their
# files: pip keeps an installed mmcv 2.0.1 of another build (a CPU variant, another torch) or a
# flora_mm 0.1.0 of other code, whose version numbers are the same
if [ "${#built[@]}" -gt 0 ]; then
  pipi --no-deps --force-reinstall "${built[@]/#/$wh/}"
fi
if [ "$layered" = 1 ]; then
  # what the node kept may declare other ranges than the closure's: shown, not fatal (the checks
  # below and the tests decide)
  "$py" -m pip check >&2 || log "pip check (above) lists declared-range conflicts with the node's packages"
fi

# 4. the checks of setup_env.sh, from a neutral folder (the installed flora_mm, not a checkout's)
cd "$(mktemp -d)"
"$py" "$here/check_env.py" >&2
if [ "$variant" = cuda ]; then
  "$py" -c 'from flora_mm.apis.cuda_ops import check_mmcv_cuda_kernels as c; print(c())' >&2
  "$py" - <<'PY' >&2
import torch
if torch.cuda.is_available():
    from mmcv.ops import box_iou_rotated
    b = torch.tensor([[10., 10., 8., 4., 0.3]], device='cuda')
    assert abs(float(box_iou_rotated(b, b)) - 1.0) < 1e-5
    print('CUDA op ok on', torch.cuda.get_device_name())
else:
    print('no GPU visible: the kernels are in the extension, not run')
PY
fi
log "installed from $wh into $py in $(( $(date +%s) - start )) s"
