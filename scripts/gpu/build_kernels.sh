#!/usr/bin/env bash
# Runs THERE (device machine, no network): builds the CUDA-extension wheels of
# mamba-ssm and causal-conv1d from the carried sdists, for sm_90 (H100/H200) only.
#
#   bash scripts/gpu/build_kernels.sh [SDIST_DIR] [WHEEL_DIR]
#       SDIST_DIR default .gpu/sdist, WHEEL_DIR default .gpu/wheels
#
# Environment knobs:
#   KERNEL_PKGS="mamba_ssm causal_conv1d"  which sdists to build (name prefixes)
#   KERNEL_GENCODE=arch=compute_90,code=sm_90   the only -gencode kept in setup.py
#   KERNEL_KEEP_LINEINFO=1     keep -lineinfo / --ptxas-options=-v (dropped by default:
#                              smaller wheels, shorter logs)
#   KERNEL_PARALLEL=1          build the packages concurrently (default 1)
#   KERNEL_TIMEOUT=420         seconds per package build (inside `timeout`)
#   KERNEL_LOG_DIR             per-package logs (default $OUT/logs if $OUT is set, else WHEEL_DIR/logs)
#   KERNEL_EXPORT_DIR          if set: copy the wheels there in pieces that the device
#                              tool brings back (<=15 MiB each; xz first if the total is
#                              large) plus SHA256SUMS; reassemble HERE with
#                              `bash scripts/gpu/fetch_kernel_sources.sh --collect DIR`
# Exit status: 0 only if every requested wheel was built.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SDIST_DIR=$(realpath -m "${1:-.gpu/sdist}")
WHEEL_DIR=$(realpath -m "${2:-.gpu/wheels}")
PKGS=${KERNEL_PKGS:-"mamba_ssm causal_conv1d"}
export KERNEL_GENCODE=${KERNEL_GENCODE:-arch=compute_90,code=sm_90}
PARALLEL=${KERNEL_PARALLEL:-1}
TMO=${KERNEL_TIMEOUT:-420}
if [ -n "${OUT:-}" ]; then LOG_DIR=${KERNEL_LOG_DIR:-$OUT/logs}; else LOG_DIR=${KERNEL_LOG_DIR:-$WHEEL_DIR/logs}; fi
WORK=/tmp/kbuild
mkdir -p "$WHEEL_DIR" "$LOG_DIR" "$WORK"
export PYTHONUNBUFFERED=1

# ninja must be on PATH or torch's BuildExtension silently compiles serially.
PYBIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH="$PYBIN:$PATH"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
echo "[build] python $(python3 -V 2>&1) at $PYBIN; nvcc: $(nvcc --version | grep -o 'release [0-9.]*')"
python3 - <<'EOF'
import torch
from torch.utils.cpp_extension import is_ninja_available, CUDA_HOME
print(f"[build] torch {torch.__version__} cuda {torch.version.cuda} CUDA_HOME={CUDA_HOME} ninja={is_ninja_available()} "
      f"cxx11abi={torch._C._GLIBCXX_USE_CXX11_ABI}")
EOF
echo "[build] gencode kept: $KERNEL_GENCODE; cores: $(nproc)"

patch_setup() {  # $1 = setup.py ; keep only $KERNEL_GENCODE in the nvcc flags
  python3 - "$1" <<'EOF'
import re, sys, textwrap
path = sys.argv[1]
src = open(path).read()
if "_kernel_sm_only" in src:
    print("[patch] already patched:", path); sys.exit(0)
m = re.search(r"^([ \t]*)ext_modules\.append\(", src, re.M)
if not m or 'extra_compile_args = {' not in src or '"-gencode"' not in src:
    sys.exit(f"[patch] {path}: anchors not found (setup.py layout changed); refusing to build")
snippet = textwrap.dedent('''\
    # --- patched by scripts/gpu/build_kernels.sh: one GPU target only ---
    def _kernel_sm_only(args):
        keep = os.environ["KERNEL_GENCODE"]
        drop = () if os.environ.get("KERNEL_KEEP_LINEINFO") else ("-lineinfo", "--ptxas-options=-v")
        out, i = [], 0
        while i < len(args):
            if args[i] == "-gencode" and i + 1 < len(args):
                i += 2
                continue
            if args[i] not in drop:
                out.append(args[i])
            i += 1
        return out + ["-gencode", keep]
    extra_compile_args["nvcc"] = _kernel_sm_only(extra_compile_args["nvcc"])
    print("[patch] nvcc flags:", " ".join(extra_compile_args["nvcc"]), flush=True)
    ''')
src = src[:m.start()] + textwrap.indent(snippet, m.group(1)) + src[m.start():]
open(path, "w").write(src)
print("[patch] ok:", path)
EOF
}

build_one() {  # $1 = package prefix, $2 = MAX_JOBS
  local pkg=$1 jobs=$2 sd dir log t0 rc
  sd=$(ls "$SDIST_DIR/$pkg"-*.tar.gz 2>/dev/null | head -n1)
  [ -n "$sd" ] || { echo "[build] $pkg: no sdist in $SDIST_DIR"; return 2; }
  rm -rf "${WORK:?}/$pkg" && mkdir -p "$WORK/$pkg" && tar xzf "$sd" -C "$WORK/$pkg" --strip-components=1
  dir=$WORK/$pkg; log=$LOG_DIR/build_$pkg.log
  patch_setup "$dir/setup.py" >"$log" 2>&1 || { cat "$log"; return 3; }
  t0=$(date +%s)
  echo "[build] $pkg: start (MAX_JOBS=$jobs, timeout ${TMO}s, log $log)"
  ( export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$jobs
    cd "$dir" && timeout "$TMO" python3 -m pip wheel -v --no-build-isolation --no-deps --no-index \
      --no-cache-dir -w "$WHEEL_DIR" . ) >>"$log" 2>&1
  rc=$?
  echo "[build] $pkg: rc=$rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
  [ $rc -eq 0 ] || tail -n 30 "$log"
  return $rc
}

T0=$(date +%s)
set -- $PKGS
declare -A RC
if [ "$PARALLEL" = 1 ] && [ $# -gt 1 ]; then
  # mamba_ssm has 11 translation units, causal_conv1d 4: split the 16 cores that way.
  declare -A PID
  for p in "$@"; do
    case $p in causal_conv1d) j=4 ;; *) j=$(( $(nproc) > 4 ? $(nproc) - 4 : 1 )) ;; esac
    build_one "$p" "$j" & PID[$p]=$!
  done
  for p in "$@"; do wait "${PID[$p]}"; RC[$p]=$?; done
else
  for p in "$@"; do build_one "$p" "$(nproc)"; RC[$p]=$?; done
fi
echo "[build] total wall $(( $(date +%s) - T0 )) s"

status=0
for p in "$@"; do [ "${RC[$p]}" -eq 0 ] || status=1; done
(cd "$WHEEL_DIR" && ls *.whl >/dev/null 2>&1 && sha256sum *.whl > SHA256SUMS && ls -l *.whl && cat SHA256SUMS)

if [ -n "${KERNEL_EXPORT_DIR:-}" ] && ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
  mkdir -p "$KERNEL_EXPORT_DIR"
  total=$(cat "$WHEEL_DIR"/*.whl | wc -c)
  for w in "$WHEEL_DIR"/*.whl; do
    b=$(basename "$w"); src=$w
    if [ "$total" -gt $(( 40 * 1024 * 1024 )) ]; then xz -T0 -6 -kc "$w" > "$WORK/$b.xz"; src=$WORK/$b.xz; b=$b.xz; fi
    if [ "$(stat -c %s "$src")" -gt $(( 15 * 1024 * 1024 )) ]; then split -b 15m -d "$src" "$KERNEL_EXPORT_DIR/$b.part-"
    else cp "$src" "$KERNEL_EXPORT_DIR/$b"; fi
  done
  cp "$WHEEL_DIR/SHA256SUMS" "$KERNEL_EXPORT_DIR/SHA256SUMS"
  echo "[build] exported to $KERNEL_EXPORT_DIR:"; ls -l "$KERNEL_EXPORT_DIR"
fi
exit $status
