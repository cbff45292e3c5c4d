# Sourced by scripts/setup_env.sh and scripts/wheelhouse.sh (both compile mmcv 2.0.1's ops).
#
# write_cxx20_wrapper PATH COMPILER: an executable that runs COMPILER with -std=c++14/17 turned
# into -std=c++20 (used for g++ and, via cuda_toolchain.sh, for nvcc). mmcv's setup.py hard-codes
# -std=c++14 while torch's headers need C++20. COMPILER is written into the script as given, so a
# quoted "${VAR:-default}" is resolved when the wrapper runs.
write_cxx20_wrapper() {
  cat >"$1" <<SH
#!/usr/bin/env bash
# mmcv's setup.py asks for C++14; torch 2.14's headers need C++20
args=()
for a in "\$@"; do
  case "\$a" in -std=c++14|-std=c++17) a=-std=c++20 ;; esac
  args+=("\$a")
done
exec $2 "\${args[@]}"
SH
  chmod +x "$1"
}
