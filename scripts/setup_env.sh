#!/usr/bin/env bash
# Builds (or reuses) flora_mm's virtual environment and prints its interpreter path on the last
# line of stdout. Called by `make env`; every other make target goes through it.
#
# - The environment lives OUTSIDE the checkout, in a folder keyed by a hash of the requirement
#   files and this script, so fresh clones (CI) reuse it: $FLORA_MM_ENV overrides the folder,
#   $FLORA_MM_CACHE the parent (default ~/.cache/flora_mm).
# - Order: torch first, then mmcv 2.0.1 compiled from source with its CPU ops against that torch,
#   then the rest, then flora_mm itself in editable mode.
# - A build is finished only when the marker file `.flora_mm_complete` exists; it is written last,
#   after the compiled ops imported. An interrupted build is wiped and redone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${FLORA_MM_PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

key="$( (cat requirements.txt requirements-test.txt requirements-build.txt scripts/setup_env.sh; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
cache="${FLORA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flora_mm}"
env_dir="${FLORA_MM_ENV:-$cache/venv-$key}"
marker="$env_dir/.flora_mm_complete"
vpy="$env_dir/bin/python"
log() { echo "[flora_mm env] $*" >&2; }

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
log "building $env_dir (first run: the mmcv ops compile takes ~10-15 min on 2 cores)"
rm -rf "$env_dir"
"$py" -m venv "$env_dir"
pipi() { "$vpy" -m pip install --disable-pip-version-check --no-input "$@" >&2; }
pipi -q --upgrade "pip==25.3"

# 1. torch and torchvision, pinned in requirements.txt; then the build tools (torch pulls the
#    newest setuptools, without pkg_resources, which mmcv's setup.py needs: the pin goes in after)
pin() { grep -E "^$1==" requirements.txt; }
pipi -q "$(pin torch)" "$(pin torchvision)"
pipi -q -r requirements-build.txt

# 2. mmcv from source with its CPU ops, against that torch.
#    Its setup.py hard-codes -std=c++14 while torch's headers need C++20: a compiler wrapper
#    rewrites the flag. No build isolation, so it compiles against the torch installed above.
wrap="$env_dir/bin/flora-cxx"
cat >"$wrap" <<'SH'
#!/usr/bin/env bash
args=()
for a in "$@"; do
  case "$a" in -std=c++14|-std=c++17) a=-std=c++20 ;; esac
  args+=("$a")
done
exec "${FLORA_MM_REAL_CXX:-g++}" "${args[@]}"
SH
chmod +x "$wrap"
PATH="$env_dir/bin:$PATH" CXX="$wrap" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  pipi --no-build-isolation --no-binary mmcv "$(pin mmcv)"

# 3. the rest, then flora_mm in editable mode (torch and mmcv are already satisfied).
pipi -q -r requirements.txt -r requirements-test.txt
pipi -q --no-deps --no-build-isolation -e "$root"

# 4. fail loudly unless the compiled ops and every OpenMMLab package import
"$vpy" - <<'PY' >&2
import flora_mm  # applies the compatibility shims first
from mmcv.ops import nms_rotated, RoIAlignRotated, nms, RoIAlign  # noqa: F401  (compiled ops)
import torch, mmcv, mmdet, mmseg, mmrotate, timm, mmengine
from mmcv.ops import box_iou_rotated
b = torch.tensor([[10., 10., 8., 4., 0.3]])
assert abs(float(box_iou_rotated(b, b)) - 1.0) < 1e-5
print('env ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__,
      'mmseg', mmseg.__version__, 'mmrotate', mmrotate.__version__, 'timm', timm.__version__)
PY
touch "$marker"
log "environment ready in $(( $(date +%s) - start )) s"
echo "$vpy"
