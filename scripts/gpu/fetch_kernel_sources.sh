#!/usr/bin/env bash
# Runs HERE (the workstation with network), never on the device machine.
#
#   bash scripts/gpu/fetch_kernel_sources.sh            # download sdists + wheels
#   bash scripts/gpu/fetch_kernel_sources.sh --collect DIR
#        # reassemble kernel wheels that a device run returned from $OUT
#        # (DIR = the run's files_at folder) into .gpu/wheels/, checking SHA256SUMS
#
# Layout (both folders are git-ignored via /.gpu/ and /.whl/ in .gitignore):
#   .gpu/sdist/   mamba_ssm-2.3.2.post1.tar.gz, causal_conv1d-1.7.0.tar.gz  (built THERE)
#   .gpu/wheels/  prebuilt sm_90 kernel wheels (come back from the device once)
#   .whl/         pure-Python / manylinux wheels that the device lacks (transformers 5.24.0)
# See docs/GPU.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MAMBA_VERSION=2.3.2.post1
CONV_VERSION=1.7.0
TRANSFORMERS_VERSION=5.24.0

collect() {
  local src=$1 dst=.gpu/wheels
  mkdir -p "$dst"
  [ -f "$src/SHA256SUMS" ] || { echo "no $src/SHA256SUMS" >&2; exit 1; }
  # SHA256SUMS lines: "<sha256>  <wheel file name>" (hash of the whole, uncompressed wheel)
  while read -r sum name; do
    [ -n "${name:-}" ] || continue
    local tmp="$dst/.$name.tmp"
    if [ -f "$src/$name" ]; then cp "$src/$name" "$tmp"
    elif ls "$src/$name".part-* >/dev/null 2>&1; then cat "$src/$name".part-* > "$tmp"
    elif [ -f "$src/$name.xz" ]; then xz -dc "$src/$name.xz" > "$tmp"
    elif ls "$src/$name".xz.part-* >/dev/null 2>&1; then cat "$src/$name".xz.part-* | xz -dc > "$tmp"
    else echo "missing pieces of $name in $src" >&2; exit 1; fi
    chmod 644 "$tmp"   # files under a run's files_at are read-only
    echo "$sum  $tmp" | sha256sum -c --quiet - || { rm -f "$tmp"; echo "checksum mismatch: $name" >&2; exit 1; }
    mv "$tmp" "$dst/$name"
    echo "ok  $dst/$name  $(du -h "$dst/$name" | cut -f1)"
  done < "$src/SHA256SUMS"
  cp "$src/SHA256SUMS" "$dst/SHA256SUMS" && chmod 644 "$dst/SHA256SUMS"
}

if [ "${1:-}" = "--collect" ]; then collect "${2:?--collect needs the folder that holds SHA256SUMS}"; exit 0; fi

mkdir -p .gpu/sdist .whl

# 1) kernel sdists. pip must prepare metadata, i.e. run setup.py, which imports torch and
#    calls nvcc; *_SKIP_CUDA_BUILD=TRUE avoids the nvcc lookup (it crashes with no CUDA
#    here: "TypeError: 'NoneType' object is not iterable"). The tarballs are unchanged by it.
#    --no-build-isolation stops pip from installing torch into a throwaway build env.
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation \
  "mamba-ssm==$MAMBA_VERSION" "causal-conv1d==$CONV_VERSION" -d .gpu/sdist

# 2) wheels for the device's Python 3.12 (README of the device tool). transformers is pure
#    Python; its Requires-Dist (huggingface-hub>=1.31,<3; tokenizers>=0.23.1,<0.24;
#    safetensors>=0.8.0; regex>=2025.10.22) are met by the device image (docs/GPU.md),
#    so no further wheels are needed. Keep ONE version of each package in .whl/.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "transformers==$TRANSFORMERS_VERSION"

sha256sum -c - <<EOF
104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028  .gpu/sdist/mamba_ssm-$MAMBA_VERSION.tar.gz
3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b  .gpu/sdist/causal_conv1d-$CONV_VERSION.tar.gz
EOF

unzip -p .whl/transformers-$TRANSFORMERS_VERSION-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v extra || true
for p in .gpu/x .whl/x; do
  git check-ignore -q "$p" || { echo "WARNING: ${p%/x}/ is not git-ignored" >&2; }
done
du -sh .gpu .whl
