"""Does the installed mmcv carry CUDA kernels for the ops our detectors need?

mmcv compiles every op into one extension, ``mmcv._ext``; a build without CUDA still imports
and runs on the CPU, and only fails at the first op on a CUDA tensor. Whether the kernels are
there is read from the extension's symbol table: nvcc emits a host-side launch stub for every
``__global__`` function, ``__device_stub__Z<length><name>...``, so a stub names a kernel whose
device code was compiled into the file (a host function of the same name would not have one).
The check needs neither a GPU nor NVIDIA's binary tools, only an unstripped extension, which is
how pip builds it.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess

# op -> CUDA kernels (``__global__`` identifiers in mmcv 2.0.1's csrc/common/cuda/*.cuh) it runs
DETECTION_OP_KERNELS: dict[str, tuple[str, ...]] = {
    'RoIAlign': ('roi_align_forward_cuda_kernel', 'roi_align_backward_cuda_kernel'),
    'nms': ('nms_cuda',),
    'RoIAlignRotated': ('roi_align_rotated_forward_cuda_kernel',
                        'roi_align_rotated_backward_cuda_kernel'),
    'nms_rotated': ('nms_rotated_cuda_kernel',),
    'box_iou_rotated': ('box_iou_rotated_cuda_kernel',),
}


def mmcv_extension_path() -> str:
    spec = importlib.util.find_spec('mmcv._ext')
    if spec is None or not spec.origin:
        raise ImportError('mmcv has no compiled extension mmcv._ext (built without MMCV_WITH_OPS?)')
    return spec.origin


def extension_symbols(path: str) -> set[str]:
    """Raw (mangled) names from the static and dynamic symbol tables, via binutils' nm."""
    nm = shutil.which('nm')
    if nm is None:
        raise RuntimeError('`nm` (binutils) is needed to read the symbols of ' + path)
    names: set[str] = set()
    for extra in ([], ['-D']):
        proc = subprocess.run([nm, *extra, '--defined-only', path], capture_output=True,
                              text=True, check=False)
        names.update(line.split()[-1] for line in proc.stdout.splitlines() if line.strip())
    return names


def mmcv_cuda_kernels(path: str | None = None) -> dict[str, dict[str, bool]]:
    """{op: {kernel: launch stub found}} for :data:`DETECTION_OP_KERNELS` in ``path``."""
    symbols = extension_symbols(path or mmcv_extension_path())
    out = {}
    for op, kernels in DETECTION_OP_KERNELS.items():
        out[op] = {}
        for kernel in kernels:
            stub = f'__device_stub__Z{len(kernel)}{kernel}'
            out[op][kernel] = any(stub in s for s in symbols)
    return out


def check_mmcv_cuda_kernels(path: str | None = None) -> str:
    """Raise RuntimeError naming every missing kernel; return a one-line summary."""
    found = mmcv_cuda_kernels(path)
    missing = [f'{op}:{k}' for op, ks in found.items() for k, ok in ks.items() if not ok]
    if missing:
        raise RuntimeError(f'mmcv extension {path or mmcv_extension_path()} lacks CUDA kernels '
                           f'for {missing}: it was built without CUDA (FORCE_CUDA=0?)')
    n = sum(len(k) for k in found.values())
    return f'mmcv CUDA kernels present for {", ".join(found)} ({n} kernels checked)'
