"""Fail unless the installed mmcv holds CUDA kernels for the detection ops (used by setup_env.sh)."""
from flora_mm.apis.cuda_ops import check_mmcv_cuda_kernels

print(check_mmcv_cuda_kernels())
