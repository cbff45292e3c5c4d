# Sourced by scripts/setup_env.sh for the `cuda` variant. Everything mmcv 2.0.1's CUDA sources need
# to compile with torch 2.14.1 (CUDA 13.0) on a machine without a GPU lives here:
#
# 1. the compiler: NVIDIA's wheels (requirements-cuda.txt), which install under
#    site-packages/nvidia/cu13/ beside the CUDA runtime headers and libraries torch brought;
# 2. CUDA_HOME: a folder of links shaped the way torch's cpp_extension looks for a toolkit
#    (bin/nvcc, include/, lib64/ with libcudart.so, which torch's wheel ships as .so.13 only);
# 3. bin/nvcc is a wrapper (setup_env.sh's write_cxx20_wrapper) that turns -std=c++14/-std=c++17
#    into -std=c++20: mmcv's setup.py hard-codes c++14 for nvcc, while torch 2.14's headers refuse
#    anything before C++20;
# 4. MMCV_CUDA_ARGS: cccl's include folder (thrust/cub for mmcv's nms kernels). mmcv's setup.py
#    passes this variable to nvcc as ONE argument, so it must hold a single flag: a list with
#    spaces reaches nvcc as one malformed -I. The four -D__CUDA_NO_HALF* defines, without which
#    mmcv's roi_align_cuda_kernel.cuh fails with "more than one operator > matches", come from
#    torch's BuildExtension itself (COMMON_NVCC_FLAGS); they are visible in the generated
#    build.ninja's cuda_post_cflags.
# No source file of mmcv is edited.

setup_cuda_toolchain() {
  local env_dir="$1" vpy="$2" archs="$3"
  "$vpy" -m pip install --disable-pip-version-check --no-input -q -r "$root/requirements-cuda.txt" >&2
  local cu13
  cu13="$("$vpy" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
  [ -x "$cu13/bin/nvcc" ] || { log "no nvcc in $cu13/bin after installing requirements-cuda.txt"; return 1; }
  [ -x "$cu13/nvvm/bin/cicc" ] || { log "no nvvm/bin/cicc in $cu13 (nvidia-nvvm missing?)"; return 1; }
  [ -f "$cu13/include/cuda_runtime.h" ] || { log "no cuda_runtime.h in $cu13/include (torch not a CUDA 13 build?)"; return 1; }
  local torch_cuda
  torch_cuda="$("$vpy" -c 'import torch; print(torch.version.cuda or "")')"
  case "$torch_cuda" in 13.0*) ;; *) log "torch is built for CUDA '$torch_cuda', requirements-cuda.txt pins 13.0"; return 1 ;; esac

  local home="$env_dir/cuda"
  mkdir -p "$home/bin" "$home/lib64"
  ln -sfn "$cu13/include" "$home/include"
  write_cxx20_wrapper "$home/bin/nvcc" "\"$cu13/bin/nvcc\""  # defined in setup_env.sh
  local lib
  for lib in "$cu13"/lib/*; do ln -sfn "$lib" "$home/lib64/$(basename "$lib")"; done
  local cudart
  cudart="$(ls "$cu13"/lib/libcudart.so.* 2>/dev/null | head -n1)"
  [ -n "$cudart" ] || { log "no libcudart.so.* in $cu13/lib"; return 1; }
  ln -sfn "$cudart" "$home/lib64/libcudart.so"

  export CUDA_HOME="$home" CUDA_PATH="$home"
  export FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST="$archs"
  export MMCV_CUDA_ARGS="-I$cu13/include/cccl"
  log "CUDA toolchain: $("$home/bin/nvcc" --version | tail -n1); archs $archs; CUDA_HOME=$home"
}
