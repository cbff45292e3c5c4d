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
#     too when the interpreter lacks it and the wheelhouse has it);
#  4. the import + compiled-ops check of setup_env.sh, and for the cuda variant the kernel check
#     of flora_mm/apis/cuda_ops.py (scripts/check_mmcv_cuda.py), plus one op on the GPU if
#     one is visible.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "[flora_mm offline] $*" >&2; }
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 WHEELHOUSE [PYTHON]" >&2; exit 2; }
wh="$(cd "$1" && pwd)" || { log "no wheelhouse folder '$1'"; exit 2; }
py="${2:-python3}"
command -v "$py" >/dev/null || { log "no interpreter '$py'"; exit 2; }
[ -f "$wh/manifest.json" ] || { log "$wh has no manifest.json (not a wheelhouse from scripts/wheelhouse.sh)"; exit 2; }
start=$(date +%s)

# 1 + 2: the checks, printing the install list on success
install_list="$("$py" - "$wh" <<'PY'
import hashlib, importlib.util, json, os, sys

wh = sys.argv[1]
m = json.load(open(os.path.join(wh, 'manifest.json')))
errors = []

listed = m['wheels']
present = {f for f in os.listdir(wh) if f.endswith('.whl')}
for f in sorted(set(listed) - present):
    errors.append(f'missing wheel {f} (listed in manifest.json)')
for f in sorted(present - set(listed)):
    errors.append(f'unlisted wheel {f} in the wheelhouse (not in manifest.json): remove it')
for f in sorted(present & set(listed)):
    with open(os.path.join(wh, f), 'rb') as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest != listed[f]:
        errors.append(f'sha256 mismatch for {f}: manifest {listed[f]}, file {digest}')
if errors:
    sys.exit('wheelhouse ' + wh + ' fails its manifest:\n  ' + '\n  '.join(errors))

py = '%d.%d' % sys.version_info[:2]
if py != m['python']:
    sys.exit(f'interpreter {sys.executable} is Python {py}; the wheelhouse is built for Python '
             f"{m['python']}")
if importlib.util.find_spec('torch') is None:
    sys.exit(f"{sys.executable} has no torch: install torch {m['torch']} first (the wheelhouse "
             f"was built against torch {m['torch_build']}, CUDA {m['torch_cuda']})")
import torch  # noqa: E402

have = torch.__version__.split('+')[0]
if have != m['torch']:
    sys.exit(f'torch version mismatch: the interpreter has torch {torch.__version__}, the '
             f"wheelhouse's mmcv was compiled against torch {m['torch_build']} "
             '(build a wheelhouse for this torch: make wheelhouse TORCH=' + have + ')')
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
if abi != m['torch_cxx11_abi']:
    sys.exit(f'torch C++ ABI mismatch: the interpreter\'s torch {torch.__version__} has '
             f"_GLIBCXX_USE_CXX11_ABI={abi}, the wheelhouse's torch {m['torch_build']} had "
             f"{m['torch_cxx11_abi']}")
cuda = torch.version.cuda
mm = lambda v: '.'.join(str(v).split('.')[:2]) if v else None  # noqa: E731
if m['variant'] == 'cuda' and mm(cuda) != mm(m['torch_cuda']):
    sys.exit(f'torch CUDA mismatch: the interpreter has torch {torch.__version__} built for CUDA '
             f"{cuda}, the wheelhouse's CUDA kernels were compiled for torch {m['torch_build']} "
             f"with CUDA {m['torch_cuda']}")
if mm(cuda) != mm(m['torch_cuda']):
    print(f"note: torch {torch.__version__} (CUDA {cuda}) vs the wheelhouse's {m['torch_build']} "
          f"(CUDA {m['torch_cuda']}): fine for the cpu variant, whose ops link no CUDA",
          file=sys.stderr)
install = list(m['install'])
if importlib.util.find_spec('torchvision') is None:
    if not any(f.startswith('torchvision-') for f in listed):
        sys.exit(f"{sys.executable} has no torchvision and the wheelhouse none: install "
                 f"torchvision {m['torchvision']} (the one paired with torch {m['torch']}) first")
    install.append(f"torchvision=={m['torchvision']}")
print(f"wheelhouse ok ({len(listed)} wheels, sha256 checked); torch {torch.__version__} "
      f"(CUDA {cuda}) matches; variant {m['variant']}"
      + (f", archs {m['cuda_arch_list']}" if m['cuda_arch_list'] else ''), file=sys.stderr)
print('\n'.join(install))
PY
)" || exit 1

# 3. no index, no compiling: wheels only, from the folder
mapfile -t pkgs <<<"$install_list"
PIP_NO_INDEX=1 "$py" -m pip install --disable-pip-version-check --no-input -q \
  --no-index --find-links "$wh" --only-binary=:all: "${pkgs[@]}" >&2
variant="$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["variant"])' "$wh/manifest.json")"

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
