#!/usr/bin/env bash
# The first run on an offline GPU node, as one command (README "Offline / cluster install"):
#
#   scripts/gpu_node_check.sh WHEELHOUSE [PYTHON] [OUT]      (or: make gpu-check-offline ...)
#
# run in a checkout copied to the node (gpu-check needs its configs/ and tests/). It installs the
# stack from WHEELHOUSE into PYTHON (default python3, which holds the node's torch) with
# scripts/install_offline.sh, then runs `python -m flora_mm.cli.gpu_check` (tiny tasks trained and
# tested on CUDA with AMP, the CUDA tests, the Table 4 benchmark) and leaves in OUT (default
# work_dirs/gpu_node_check) at most eight files: gpu_check.md (the report), install.log, the
# benchmarks' JSON and PNG, and logs.tar.gz (every step's log, no checkpoint).
#
# GPU_CHECK_ARGS=--rehearse-on-cpu runs the same on a machine without a GPU (the install, the
# steps on the CPU): what to run before a GPU machine's minutes are spent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[flora_mm gpu-node] $*" >&2; }
[ $# -ge 1 ] && [ $# -le 3 ] || { echo "usage: $0 WHEELHOUSE [PYTHON] [OUT]" >&2; exit 2; }
wh="$1"
py="${2:-python3}"
# a relative interpreter path stays valid after the cd into the checkout below
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
out="${3:-$root/work_dirs/gpu_node_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
files=(gpu_check.md bench_tiny.json bench_tiny.png bench_large.json bench_large.png)
for f in install.log logs.tar.gz "${files[@]}"; do rm -f "$out/$f"; done  # no earlier run's
t0=$(date +%s)

# 1. the offline install (fails here, with its own message, on a wheelhouse/torch mismatch)
set +e
bash "$root/scripts/install_offline.sh" "$wh" "$py" 2>&1 | tee "$out/install.log" >&2
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || { log "offline install failed (exit $rc): $out/install.log"; exit "$rc"; }
t1=$(date +%s)
log "installed in $((t1 - t0)) s"

# 2. gpu-check in the checkout, its work folder beside OUT's files
# gpu-check runs the checkout's flora_mm (the source the wheel was built from: it needs the
# checkout's configs/ and tests/); install_offline.sh above checked the installed one
run="$(mktemp -d)"
trap 'rm -rf "$run"' EXIT
cd "$root"
set +e
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 "$py" -m flora_mm.cli.gpu_check --work-dir "$run" ${GPU_CHECK_ARGS:-}
rc=$?
set -e
for f in "${files[@]}"; do
  if [ -f "$run/$f" ]; then cp "$run/$f" "$out/"; fi
done
# every log, not the checkpoints; a failure here must not hide gpu-check's exit status
tar -czf "$out/logs.tar.gz" -C "$run" --exclude='*.pth' --exclude='*.safetensors' \
  --exclude='*.pt' . || log "could not write $out/logs.tar.gz"
log "gpu-check exit $rc; install $((t1 - t0)) s, checks $(( $(date +%s) - t1 )) s; files in $out"
exit "$rc"
