"""The ORIGINAL OmniMamba's own CUDA-graph decode (`cg=True`), timed at batch 1 (issue #8, deliverable 6).

    python benchmarks/bench_original_decode.py --original PATH [--dtype bfloat16,float32] [--tiny] [--out FILE]
    python benchmarks/bench_generation.py --original PATH ...      # the same, after the port, in one run

PATH is a checkout (or `git archive`) of hustvl/OmniMamba (b372978). It is imported from there at run time and never
copied into this repository. The model is built as the parity harness builds it (`tests/parity/run_original_parity.py`,
docs/PARITY.md), reusing the harness's functions: the original `OmniMamba(args, stage="inference")` from its own
`config/config_stage2.yaml` at the released 1.3B widths (or the harness's tiny widths), offline run-time patches (no
downloads: random VQ checkpoint, `pretrained=False` towers, a stand-in tokenizer), fixed-seed random weights, then
cast to `dtype` on CUDA.

What is timed: wall time between `torch.cuda.synchronize()` calls, median of 3, after a warm-up call (Triton JIT,
CUDA-graph capture). Greedy (`top_k=1`), batch 1, no EOS, so every call generates exactly the tokens asked for.

* T2I: `MambaLMHeadModel.generate(..., cg=True, task="t2i")` with exactly the arguments the original's
  `OmniMamba.t2i_generate` passes (captured from one real call: the caption embeddings plus the position table over
  the 72-position prompt, `max_length` = 72 + 256), with its graph cache kept between calls.
  - ms per image token = (T(256 tokens) - T(1 token)) / 255: the decode phase only, i.e. one graph replay plus the
    original's own sampling loop per token;
  - s per image = T(256 tokens): prefill + 256 tokens (tokens only, no pixel decode), like the port's `generate()`;
  - `t2i_generate()` itself, as a user calls it: it drops the graph cache after every call, so every call captures
    the graph again, and it decodes the pixels with the VQ.
* MMU: one image (random pixels) + the harness's short prompt (`USER: What is this? ASSISTANT:`), embeddings built as
  `scripts/inference_mmu.py` builds them, then `generate(..., cg=True, task="mmu")` for N and for 1 new tokens.
  ms per token = (T(N) - T(1)) / (N - 1), so the image encoding and the prefill are excluded; T(1) is reported too.

`--without-causal-conv1d` hides causal-conv1d from the process (imports of it fail, so mamba-ssm falls back to its
PyTorch conv code): the configuration the issue's reference figures were measured in (3.70 ms per T2I token in bf16).

Needs a CUDA GPU and the original's stack (mamba-ssm with causal-conv1d, timm, torchvision, einops, PyYAML). Importing
this module imports neither the original nor mamba-ssm. One size (full or tiny) per process: the harness's run-time
patches are size-specific.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("mamba_ssm", "causal_conv1d", "timm", "torchvision", "einops", "yaml")
HIDDEN = ("causal_conv1d", "causal_conv1d_cuda")


class _HideModules:
    """A meta-path finder under which `import causal_conv1d` (and its CUDA extension) raises ImportError, as if the
    package were not installed; mamba-ssm catches that and uses its PyTorch conv fallback."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{name} hidden by --without-causal-conv1d")
        return None


def hide_causal_conv1d() -> None:
    """Make causal-conv1d unimportable in this process (before mamba-ssm is imported)."""
    if any(m.split(".")[0] in HIDDEN for m in sys.modules):
        raise RuntimeError("--without-causal-conv1d: causal_conv1d is already imported in this process")
    if not causal_conv1d_hidden():
        sys.meta_path.insert(0, _HideModules())


def causal_conv1d_hidden() -> bool:
    return any(isinstance(f, _HideModules) for f in sys.meta_path)


_PATCHED: dict = {}  # (original path, size) -> the harness's patched modules (patches are applied once per process)


def check_requirements(original_path) -> Path:
    """Raise a clear error unless `original_path` is a checkout of the original and a CUDA GPU + its stack are here."""
    path = Path(original_path).resolve()
    if not (path / "models" / "omnimamba.py").is_file() or not (path / "config" / "config_stage2.yaml").is_file():
        raise FileNotFoundError(f"--original {original_path}: not a checkout of hustvl/OmniMamba "
                                "(models/omnimamba.py and config/config_stage2.yaml expected)")  # fmt: skip
    hidden = causal_conv1d_hidden()
    missing = [m for m in REQUIRED if not (hidden and m in HIDDEN) and importlib.util.find_spec(m) is None]
    if not torch.cuda.is_available() or missing:
        why = ([] if torch.cuda.is_available() else ["no CUDA GPU"]) + [f"{m} is not installed" for m in missing]
        raise RuntimeError("timing the original OmniMamba's CUDA-graph decode (cg=True) needs a CUDA GPU and mamba-ssm "
                           "(+ causal-conv1d, timm, torchvision, einops, PyYAML), as the original itself does: "
                           + "; ".join(why))  # fmt: skip
    return path


def _harness():
    for p in (REPO / "src", REPO / "tests"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    from parity import run_original_parity

    return run_original_parity


def build_random_original(path: Path, size: str, dtype: torch.dtype, device, seed: int = 0):
    """The original at `size` ("full" | "tiny"), offline, with the harness's fixed-seed random weights, in `dtype`."""
    h = _harness()
    if any(s != size for (_, s) in _PATCHED):
        raise RuntimeError("one original size per process (the harness's run-time patches are size-specific)")
    key = (str(path), size)
    if key not in _PATCHED:
        tokenizer = h.make_base_tokenizer(h.base_tokenizer_json(size))
        workdir = Path(tempfile.mkdtemp(prefix="omnimamba_original_"))
        _PATCHED[key] = h.install_offline_patches(path, size, tokenizer, workdir)
    mods = _PATCHED[key]
    torch.manual_seed(seed)
    device = torch.device(device)
    build_device = device if size == "full" else torch.device("cpu")  # as the harness: full size built on the GPU
    with torch.device(build_device):
        model = h.build_original(mods, path, size)
    h.randomize_(model, seed)
    return mods, model.to(device=device, dtype=dtype).eval()


def time_original(mods, model, size: str, device, cg: bool = True, repeat: int = 3, mmu_new_tokens: int | None = None):
    """Times the built original (see the module docstring). `cg=False` / CPU only for dry runs of this code."""
    h = _harness()
    device = torch.device(device)
    lb = model.llm_backbone
    mamba = lb.mamba
    up = lb.uni_prompting
    dtype = next(model.parameters()).dtype
    generate = type(mamba).generate  # the original's GenerationMixin.generate -> decode(..., cg=cg)

    def timed(fn):
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    no_cc1d = causal_conv1d_hidden()
    tag = f"original (cg={cg}, {str(dtype).replace('torch.', '')}, {size}{', no causal-conv1d' if no_cc1d else ''})"
    out = {"size": size, "dtype": str(dtype), "cg": cg, "batch": 1, "repeat": repeat,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "causal_conv1d": not no_cc1d,
           "parameters": sum(p.numel() for p in model.parameters()),
           "env": {k: os.environ.get(k) for k in ("MAMBA_DETERMINISTIC", "TRITON_F32_DEFAULT")}}  # fmt: skip

    # ---- T2I: record the arguments t2i_generate passes to generate, then call generate with them directly
    text_ids = h.original_t2i_ids(model, h.T2I_CAPTIONS[0])[None].to(device)
    captured = {}

    def spy(**kwargs):
        captured.update(kwargs)
        return generate(mamba, **kwargs)

    def t2i_generate():
        with torch.no_grad():
            return model.t2i_generate(text_ids=text_ids, temperature=1.0, top_p=0.0, top_k=1, fast=cg)

    mamba.generate = spy
    try:
        t2i_generate()  # warm-up: JIT, graph capture
        t2i_call_s = timed(t2i_generate)
    finally:
        del mamba.generate
    n_img = lb.num_tokens
    prompt_len = captured["input_embeddings"].shape[1]
    assert captured["max_length"] == prompt_len + n_img and captured["cg"] == cg and captured["task"] == "t2i"

    def t2i(n):
        seq = generate(mamba, **{**captured, "max_length": prompt_len + n})
        assert seq.shape[1] == text_ids.shape[1] + n, seq.shape
        return seq

    mamba._decoding_cache = None
    t2i(n_img)  # warm-up: capture the graph once and keep it
    t_full, t_one = timed(lambda: t2i(n_img)), timed(lambda: t2i(1))
    t2i_ms = (t_full - t_one) / (n_img - 1) * 1e3
    out["t2i_b1"] = {"prompt_positions": prompt_len, "new_tokens": n_img, "ms_per_token_decode": t2i_ms,
                     "s_per_image": t_full, "ms_per_token_call": t_full / n_img * 1e3, "first_token_ms": t_one * 1e3,
                     "t2i_generate_call_s": t2i_call_s}  # fmt: skip
    print(f"{tag}: T2I {t2i_ms:.3f} ms per image token (decode phase, batch 1)", flush=True)
    print(f"{tag}: T2I {t_full:.3f} s per image (prefill + {n_img} tokens, graph kept)", flush=True)
    print(f"{tag}: T2I t2i_generate() {t2i_call_s:.3f} s per call (re-captures the graph every call, + VQ decode)",
          flush=True)  # fmt: skip

    # ---- MMU: one image + a short prompt, embeddings as scripts/inference_mmu.py, then n and 1 new tokens
    mamba._decoding_cache = None  # the original keys this cache without the task: never share it between tasks
    new = mmu_new_tokens or (16 if size == "tiny" else 256)
    _, prompt_ids = h.original_mmu_prompt_ids(mods, up.text_tokenizer, h.MMU_QUESTION)
    specials = torch.cat([up.sptids_dict[t] for t in ("<|mmu|>", "<|soi|>", "<|eoi|>", "<|sot|>")])
    ids = torch.cat([specials, prompt_ids]).long()[None].to(device)
    s = h.SIZES[size]["image_size"]
    g = torch.Generator().manual_seed(0)
    pixels = {k: torch.randn(1, 3, s, s, generator=g).to(device, dtype) for k in ("dino", "siglip")}
    positions = []

    def mmu(n):
        with torch.no_grad():
            image = model.projector(model.vision_backbone(pixels))
            text = lb.embed_input_ids(ids)
            emb = torch.cat((text[:, :2], image, text[:, 2:]), dim=1)
        positions[:] = [emb.shape[1]]
        seq = generate(mamba, input_ids=ids, input_embeddings=emb, cond=None, eos_token_id=None,
                       max_length=emb.shape[1] + n, temperature=1.0, top_p=0.0, top_k=1, cg=cg, task="mmu")  # fmt: skip
        assert seq.shape[1] == ids.shape[1] + n, seq.shape
        return seq

    mmu(new)  # warm-up: JIT, graph capture (sized for the longest call)
    t_new, t_one = timed(lambda: mmu(new)), timed(lambda: mmu(1))
    mmu_ms = (t_new - t_one) / (new - 1) * 1e3
    out["mmu_b1"] = {"prompt_positions": positions[0], "new_tokens": new, "ms_per_token_decode": mmu_ms,
                     "image_plus_prefill_ms": t_one * 1e3, "generate_s": t_new}  # fmt: skip
    print(f"{tag}: MMU {mmu_ms:.3f} ms per generated token (decode phase, {new} new tokens, batch 1)", flush=True)
    print(f"{tag}: MMU {t_one * 1e3:.1f} ms image encoding + prefill of {positions[0]} positions + first token",
          flush=True)  # fmt: skip
    mamba._decoding_cache = None
    return out


def bench_original(original_path: str, dtype: torch.dtype, tiny: bool) -> dict:
    """Build the original (full 1.3B, or the harness's tiny size) in `dtype` with random weights on CUDA and time its
    own CUDA-graph decode at batch 1: T2I ms per image token and s per image, MMU ms per generated token."""
    path = check_requirements(original_path)
    size = "tiny" if tiny else "full"
    mods, model = build_random_original(path, size, dtype, "cuda")
    try:
        return time_original(mods, model, size, "cuda", cg=True)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True, help="checkout of the original OmniMamba code (hustvl/OmniMamba)")
    ap.add_argument("--dtype", default="bfloat16", help="comma-separated: bfloat16, float16, float32")
    ap.add_argument("--tiny", action="store_true", help="the parity harness's tiny size instead of the full 1.3B")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--without-causal-conv1d", action="store_true",
                    help="hide causal-conv1d (the configuration of the issue's reference figures)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.without_causal_conv1d:
        hide_causal_conv1d()
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if bad := [d for d in dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]:
        ap.error(f"unknown dtype(s): {bad}")
    try:
        check_requirements(args.original)
    except (RuntimeError, FileNotFoundError) as e:
        ap.error(str(e))
    results = {d: bench_original(args.original, getattr(torch, d), args.tiny) for d in dtypes}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
