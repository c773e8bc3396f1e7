# Runs THERE. Source it (bash) at the start of every device command, from the repo root:
#
#   source scripts/gpu/device_env.sh || exit 1; <your command>
#   GPU_SMOKE=1 source scripts/gpu/device_env.sh   # + tiny checked call of each kernel (~1 min cold)
#
# Run with carry [".gpu", ".whl"]. It installs, into $GPU_SITE (default /tmp/site):
#   .whl/*.whl          (transformers 5.24.0, ...)       from scripts/gpu/fetch_kernel_sources.sh
#   .gpu/wheels/*.whl   prebuilt sm_90 mamba_ssm + causal_conv1d (also *.whl.xz or *.part-NN)
# then prepends $GPU_SITE to PYTHONPATH, sets PYTHONUNBUFFERED=1 and prints versions + GPU.
# No `set -e` here: it is sourced into the caller's shell. Returns non-zero on failure.
# See docs/GPU.md.

_gpu_env_main() {
  local t0 root site w b tmp
  t0=$(date +%s)
  export PYTHONUNBUFFERED=1
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  site=${GPU_SITE:-/tmp/site}
  export GPU_SITE=$site
  mkdir -p "$site" /tmp/gpu_wheels
  local -a whls=()
  for w in "$root"/.whl/*.whl "$root"/.gpu/wheels/*.whl; do [ -f "$w" ] && whls+=("$w"); done
  # kernel wheels that are still compressed / split (as they came back from $OUT)
  for w in "$root"/.gpu/wheels/*.whl.xz "$root"/.gpu/wheels/*.whl.part-00 "$root"/.gpu/wheels/*.whl.xz.part-00; do
    [ -f "$w" ] || continue
    b=$(basename "$w"); b=${b%.part-00}; tmp=/tmp/gpu_wheels/${b%.xz}
    [ -f "$root/.gpu/wheels/${b%.xz}" ] && continue
    case $w in
      *.xz.part-00) cat "${w%-00}"-* | xz -dc > "$tmp" ;;
      *.part-00)    cat "${w%-00}"-* > "$tmp" ;;
      *.xz)         xz -dc "$w" > "$tmp" ;;
    esac && whls+=("$tmp")
  done
  if ! ls "$root"/.gpu/wheels/mamba_ssm-* >/dev/null 2>&1; then
    echo "[device_env] NO prebuilt kernel wheels in .gpu/wheels: mamba_ssm / causal_conv1d will not import."
    echo "[device_env]   build them (carry .gpu, ~5 min incl. start):  KERNEL_EXPORT_DIR=\$OUT bash scripts/gpu/build_kernels.sh .gpu/sdist .gpu/wheels"
    echo "[device_env]   then HERE: bash scripts/gpu/fetch_kernel_sources.sh --collect <files_at>   (docs/GPU.md)"
  fi
  if [ ${#whls[@]} -gt 0 ]; then
    local pipout
    pipout=$(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${whls[@]}" 2>&1) || { echo "$pipout"; echo "[device_env] pip install failed"; return 1; }
    echo "[device_env] installed ${#whls[@]} wheels into $site: $(for w in "${whls[@]}"; do basename "$w" | cut -d- -f1,2; done | tr '\n' ' ')"
  fi
  case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  # Triton / inductor caches on the local disk of the (fresh) machine
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
  python3 - <<'EOF' || return 1
import importlib, importlib.metadata as md
import torch
def v(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return "-"
names = ["torch", "triton", "transformers", "huggingface_hub", "tokenizers", "safetensors",
         "accelerate", "peft", "datasets", "einops", "mamba_ssm", "causal_conv1d"]
print("[device_env] " + " ".join(f"{n}={v(n)}" for n in names))
p = torch.cuda.get_device_properties(0)
print(f"[device_env] GPU {torch.cuda.get_device_name(0)} sm_{p.major}{p.minor} {p.total_memory/2**30:.0f} GiB "
      f"x{torch.cuda.device_count()}, torch CUDA {torch.version.cuda}")
for mod in ("selective_scan_cuda", "causal_conv1d_cuda"):   # the compiled extensions load?
    try: importlib.import_module(mod)
    except Exception as e: print(f"[device_env] WARNING: import {mod} failed: {e!r}")
EOF
  echo "[device_env] ready in $(( $(date +%s) - t0 )) s; PYTHONPATH=$PYTHONPATH"
}

_gpu_smoke() {  # tiny call of each kernel on random CUDA tensors, checked against the packages' refs
  python3 - <<'EOF'
import time, torch
t0 = time.time()
import mamba_ssm, causal_conv1d
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, ssd_chunk_scan_combined_ref
from mamba_ssm.ops.triton.selective_state_update import selective_state_update, selective_state_update_ref
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm, rms_norm_ref
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref
from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref, causal_conv1d_update_ref
print(f"[smoke] imports ok ({time.time()-t0:.1f} s): mamba_ssm {mamba_ssm.__version__} from {mamba_ssm.__file__}")
torch.manual_seed(0); dev = "cuda"; bad = []
def rel(a, b): a, b = a.double(), b.double(); return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
def check(name, out, ref, tol):
    t = time.time(); e = rel(out, ref); ok = bool(torch.isfinite(out).all()) and e < tol
    print(f"[smoke] {'ok  ' if ok else 'FAIL'} {name:38s} rel_err={e:.2e} (tol {tol:g})")
    if not ok: bad.append(name)
# Mamba-2 SSD chunked scan, fwd + bwd (Triton); ngroups < nheads, with D, z, dt_bias, softplus
b, l, h, p, n, g, cs = 2, 256, 8, 32, 64, 2, 64
x = torch.randn(b, l, h, p, device=dev, requires_grad=True)
dt = (torch.rand(b, l, h, device=dev) - 2.0).requires_grad_()
A = (-torch.rand(h, device=dev) - 0.5)
B_, C_ = torch.randn(b, l, g, n, device=dev), torch.randn(b, l, g, n, device=dev)
D, z, dtb = torch.randn(h, device=dev), torch.randn(b, l, h, p, device=dev), torch.rand(h, device=dev)
t = time.time()
y = mamba_chunk_scan_combined(x, dt, A, B_, C_, cs, D=D, z=z, dt_bias=dtb, dt_softplus=True)
y.sum().backward(); gx = x.grad.clone(); x.grad = None
torch.cuda.synchronize(); print(f"[smoke] mamba_chunk_scan_combined fwd+bwd first call {time.time()-t:.1f} s (Triton JIT)")
yr = ssd_chunk_scan_combined_ref(x, dt, A, B_, C_, cs, D=D, z=z, dt_bias=dtb, dt_softplus=True)
yr.sum().backward()
check("mamba_chunk_scan_combined fwd", y, yr, 1e-2)   # Triton dots in tf32
check("mamba_chunk_scan_combined bwd dx", gx, x.grad, 3e-2)
# one decoding step (Triton)
state = torch.randn(b, h, p, n, device=dev); xs = torch.randn(b, h, p, device=dev)
dts = torch.randn(b, h, p, device=dev); As = -torch.rand(h, p, n, device=dev)
Bs, Cs = torch.randn(b, g, n, device=dev), torch.randn(b, g, n, device=dev)
Ds, dtbs = torch.randn(h, p, device=dev), torch.randn(h, p, device=dev)
s1, s2 = state.clone(), state.clone()
o = selective_state_update(s1, xs, dts, As, Bs, Cs, D=Ds, dt_bias=dtbs, dt_softplus=True)
orf = selective_state_update_ref(s2, xs, dts, As, Bs, Cs, D=Ds, dt_bias=dtbs, dt_softplus=True)
check("selective_state_update out", o, orf, 1e-3); check("selective_state_update state", s1, s2, 1e-3)
# gated RMSNorm (Triton), bf16
d = 1024
norm = RMSNorm(d, eps=1e-5, group_size=256, norm_before_gate=False, device=dev, dtype=torch.bfloat16)
xn = torch.randn(4, 100, d, device=dev, dtype=torch.bfloat16); zn = torch.randn_like(xn)
check("RMSNorm (gated, grouped) bf16", norm(xn, zn),
      rms_norm_ref(xn, norm.weight, None, z=zn, eps=1e-5, group_size=256, norm_before_gate=False), 1e-2)
# causal conv1d (CUDA extension), bf16, width 4, silu
dim, L, w = 256, 300, 4
xc = torch.randn(2, dim, L, device=dev, dtype=torch.bfloat16)
wc = torch.randn(dim, w, device=dev, dtype=torch.bfloat16); bc = torch.randn(dim, device=dev, dtype=torch.bfloat16)
check("causal_conv1d_fn bf16", causal_conv1d_fn(xc, wc, bc, activation="silu"),
      causal_conv1d_ref(xc.float(), wc.float(), bc.float(), activation="silu"), 1e-2)
cst = torch.randn(2, dim, w - 1, device=dev, dtype=torch.bfloat16); c1, c2 = cst.clone(), cst.clone()
x1 = torch.randn(2, dim, device=dev, dtype=torch.bfloat16)
check("causal_conv1d_update bf16", causal_conv1d_update(x1, c1, wc, bc, activation="silu"),
      causal_conv1d_update_ref(x1, c2, wc, bc, activation="silu"), 1e-2)
# Mamba-1 selective scan (the compiled selective_scan_cuda), fp32
u = torch.randn(2, 64, 128, device=dev); delta = torch.rand(2, 64, 128, device=dev)
As1 = -torch.rand(64, 16, device=dev); Bs1, Cs1 = torch.randn(2, 16, 128, device=dev), torch.randn(2, 16, 128, device=dev)
check("selective_scan_fn (selective_scan_cuda)", selective_scan_fn(u, delta, As1, Bs1, Cs1, delta_softplus=True),
      selective_scan_ref(u, delta, As1, Bs1, Cs1, delta_softplus=True), 1e-3)
print(f"[smoke] {'ALL OK' if not bad else 'FAILED: ' + ', '.join(bad)} in {time.time()-t0:.1f} s")
raise SystemExit(1 if bad else 0)
EOF
}

_gpu_env_main && { [ "${GPU_SMOKE:-0}" != 1 ] || _gpu_smoke; }
