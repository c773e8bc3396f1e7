"""Original-layout OmniMamba checkpoints for the conversion tests, built from the spec's key table.

* `key_table()` reads `fixtures/original_keys_1p3b.json` (ORIGINAL-SPEC Appendix A + B as data, 1674 keys);
* `original_shapes(dims)` expands the Appendix A key patterns for any model size, with one shape rule per key
  pattern (checked against the JSON's 1.3B shapes by the tests); the VQ part comes from `test_vq.llamagen_shapes`;
* `random_original_state_dict(...)` fills such a layout with random, numerically sensible values;
* `write_original_release(...)` writes it the way the artefacts are published: the OmniMamba `.pth` with only the LM
  and projector in fp16 (tied copies saved as separate tensors), the timm DINOv2 tower at a larger native grid, the
  SigLIP tower as an open_clip checkpoint (`visual.trunk.*` + text-tower entries), LlamaGen's `{"model": ...}`.

The independent references of the timm ViT and LlamaGen VQ live in `test_vision.py` / `test_vq.py` and are
re-exported here, so the conversion tests can cross-check `omnimamba_hf.conversion.reference` against them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_vision import ref_dino, ref_siglip, timm_dino_sd, timm_siglip_sd  # noqa: F401 - re-exported
from test_vq import llamagen_shapes, ref_decode_code, random_llamagen_state_dict  # noqa: F401 - re-exported

FIXTURE = Path(__file__).parent / "fixtures" / "original_keys_1p3b.json"
DINO = "vision_backbone.dino_featurizer."
SIGLIP = "vision_backbone.siglip_featurizer."
VQ = "llm_backbone.vqvae."
LM = "llm_backbone.mamba."


def key_table() -> dict:
    return json.loads(FIXTURE.read_text())


@dataclass(frozen=True)
class Dims:
    """Sizes of an original OmniMamba (names follow the original code)."""

    d_model: int
    n_layer: int
    d_inner: int
    nheads: int
    d_state: int
    d_conv: int
    vocab: int
    img_vocab: int
    img_mlp: int
    proj_hidden: int
    rank: int
    mmu_rows: int
    t2i_rows: int
    dino_width: int
    dino_depth: int
    dino_mlp: int
    dino_regs: int
    siglip_width: int
    siglip_depth: int
    siglip_mlp: int
    patch: int
    grid: int
    ngroups: int = 1

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @classmethod
    def from_config(cls, c) -> "Dims":
        t, v = c.text_config, c.vision_config
        dc, sc = v.dino_config, v.siglip_config
        return cls(
            d_model=t.hidden_size, n_layer=t.num_hidden_layers, d_inner=t.num_heads * t.head_dim, nheads=t.num_heads,
            d_state=t.state_size, d_conv=t.conv_kernel, vocab=t.vocab_size, img_vocab=c.image_vocab_size,
            img_mlp=c.image_embedding_intermediate_size, proj_hidden=c.projector_intermediate_size,
            rank=c.task_lora_rank, mmu_rows=c.mmu_max_position_embeddings, t2i_rows=c.t2i_max_position_embeddings,
            dino_width=dc.hidden_size, dino_depth=dc.num_hidden_layers, dino_mlp=int(dc.hidden_size * dc.mlp_ratio),
            dino_regs=dc.num_register_tokens, siglip_width=sc.hidden_size, siglip_depth=sc.num_hidden_layers,
            siglip_mlp=sc.intermediate_size, patch=sc.patch_size, grid=sc.image_size // sc.patch_size,
            ngroups=t.n_groups,
        )  # fmt: skip


def _vit_shape(leaf: str, w: int, mlp: int, d: Dims, regs: int) -> tuple[int, ...]:
    table = {
        "cls_token": (1, 1, w), "reg_token": (1, regs, w), "pos_embed": (1, d.grid**2, w),
        "patch_embed.proj.weight": (w, 3, d.patch, d.patch), "patch_embed.proj.bias": (w,),
        "attn_pool.latent": (1, 1, w), "attn_pool.kv.weight": (2 * w, w), "attn_pool.kv.bias": (2 * w,),
    }  # fmt: skip
    if leaf in table:
        return table[leaf]
    leaf = re.sub(r"^(blocks\.\{i\}|attn_pool)\.", "", leaf)
    rules = {
        r"^(norm1|norm2|norm)\.(weight|bias)$": (w,), r"^ls[12]\.gamma$": (w,),
        r"^attn\.qkv\.weight$": (3 * w, w), r"^attn\.qkv\.bias$": (3 * w,),
        r"^(attn\.proj|q|proj)\.weight$": (w, w), r"^(attn\.proj|q|proj)\.bias$": (w,),
        r"^mlp\.fc1\.weight$": (mlp, w), r"^mlp\.fc1\.bias$": (mlp,),
        r"^mlp\.fc2\.weight$": (w, mlp), r"^mlp\.fc2\.bias$": (w,),
    }  # fmt: skip
    for pattern, shape in rules.items():
        if re.match(pattern, leaf):
            return shape
    raise KeyError(leaf)


def _lm_shape(leaf: str, d: Dims) -> tuple[int, ...]:
    m = d.d_model
    rules = {
        r"^backbone\.pos_embed$": (1, d.t2i_rows, m), r"^backbone\.mmu_pos_embed$": (1, d.mmu_rows, m),
        r"^(backbone\.img_embeddings\.word_embeddings|img_head)\.weight$": (d.img_vocab, m),
        r"^backbone\.img_embeddings\.project_in\.projector\.0\.weight$": (d.img_mlp, m),
        r"^backbone\.img_embeddings\.project_in\.projector\.0\.bias$": (d.img_mlp,),
        r"^backbone\.img_embeddings\.project_in\.projector\.2\.weight$": (m, d.img_mlp),
        r"^backbone\.img_embeddings\.project_in\.projector\.[24]\.bias$": (m,),
        r"^backbone\.img_embeddings\.project_in\.projector\.4\.weight$": (m, m),
        r"^backbone\.caption_embed\.cap_proj\.fc[12]\.weight$": (m, m),
        r"^(backbone\.embedding|lm_head)\.weight$": (d.vocab, m),
        r"^backbone\.(layers\.\{i\}\.norm|norm_f)\.weight$": (m,),
        r"\.mixer\.(dt_bias|A_log|D)$": (d.nheads,),
        r"\.mixer\.in_proj\.weight$": (d.in_proj, m),
        r"\.mixer\.in_proj\.(mmu|t2i)_lora_A0\.weight$": (d.rank, m),
        r"\.mixer\.in_proj\.(mmu|t2i)_lora_B0\.weight$": (d.in_proj, d.rank),
        r"\.mixer\.conv1d\.weight$": (d.conv_dim, 1, d.d_conv), r"\.mixer\.conv1d\.bias$": (d.conv_dim,),
        r"\.mixer\.norm\.weight$": (d.d_inner,), r"\.mixer\.out_proj\.weight$": (m, d.d_inner),
    }  # fmt: skip
    for pattern, shape in rules.items():
        if re.search(pattern, leaf):
            return shape
    raise KeyError(leaf)


def _projector_shape(leaf: str, d: Dims) -> tuple[int, ...]:
    vision = d.dino_width + d.siglip_width
    return {
        "0.weight": (d.proj_hidden, vision), "0.bias": (d.proj_hidden,),
        "2.weight": (d.d_model, d.proj_hidden), "2.bias": (d.d_model,),
        "4.weight": (d.d_model, d.d_model), "4.bias": (d.d_model,),
    }[leaf]  # fmt: skip


def pattern_shape(pattern: str, d: Dims) -> tuple[int, ...]:
    """Shape of one Appendix A key pattern for the sizes `d`."""
    if pattern.startswith(SIGLIP):
        return _vit_shape(pattern[len(SIGLIP) :], d.siglip_width, d.siglip_mlp, d, 0)
    if pattern.startswith(DINO):
        return _vit_shape(pattern[len(DINO) :], d.dino_width, d.dino_mlp, d, d.dino_regs)
    if pattern.startswith(LM):
        return _lm_shape(pattern[len(LM) :], d)
    if pattern.startswith("projector.projector."):
        return _projector_shape(pattern[len("projector.projector.") :], d)
    raise KeyError(pattern)


def original_shapes(d: Dims, vq_config=None) -> dict[str, tuple[int, ...]]:
    """Full original state-dict layout (Appendix A patterns expanded for `d`, + the VQ) in state-dict order."""
    out = {}
    for row in key_table()["appendix_a"]:
        shape = pattern_shape(row["key"], d)
        if "{i}" not in row["key"]:
            out[row["key"]] = shape
            continue
        depth = d.siglip_depth if row["key"].startswith(SIGLIP) else d.dino_depth if row["key"].startswith(DINO) else d.n_layer
        for i in range(depth):
            out[row["key"].replace("{i}", str(i))] = shape
    if vq_config is not None:
        out.update({VQ + k: v for k, v in llamagen_shapes(vq_config).items()})
    # the table lists blocks pattern by pattern; the real state dict is block by block (same key set)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(key: str):
    prefixes = (SIGLIP, DINO, VQ, LM, "projector.")
    group = next(i for i, p in enumerate(prefixes) if key.startswith(p))
    m = re.search(r"\.(blocks|layers)\.(\d+)\.", key)
    return (group, int(m.group(2)) if m else -1)


def random_original_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values with the right structure: Mamba-2 parameters in their usual ranges (A_log = log U[1, 16],
    dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1]), non-zero LoRA B (so the two tasks differ), norms around
    1, fan-in-scaled matrices, tied copies equal to their sources."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("lm_head.weight") or key.endswith("img_head.weight"):
            continue
        if key.endswith(".A_log"):
            v = torch.log(torch.empty(shape).uniform_(1, 16, generator=g))
        elif key.endswith(".dt_bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            v = dt + torch.log(-torch.expm1(-dt))
        elif key.endswith(".D") or "norm" in key.split(".")[-2] and key.endswith("weight") or key.endswith("gamma"):
            v = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("quantize.codebook_used"):
            v = torch.zeros(shape)
        elif key.startswith(VQ):
            continue  # the VQ part comes from test_vq's generator: add it with `with_vq`
        elif len(shape) >= 2 and not key.endswith(("pos_embed", "_token", "latent")) and "embedding" not in key:
            fan_in = math.prod(shape[1:])
            v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif len(shape) == 1:
            v = 0.1 * torch.randn(shape, generator=g)
        else:
            v = 0.5 * torch.randn(shape, generator=g)  # embedding tables, position tables, class/register tokens
        sd[key] = v
    for head, source in ((f"{LM}lm_head.weight", f"{LM}backbone.embedding.weight"),
                         (f"{LM}img_head.weight", f"{LM}backbone.img_embeddings.word_embeddings.weight")):  # fmt: skip
        if head in shapes:
            sd[head] = sd[source]  # the same tensor, as in the original module
    return sd


def with_vq(sd: dict, vq_config, seed: int = 0) -> dict:
    return {**sd, **{VQ + k: v for k, v in random_llamagen_state_dict(vq_config, seed=seed).items()}}


def split(sd: dict) -> dict[str, dict]:
    """The canonical full layout split into its groups (keys of sub-models relative to the sub-model)."""
    out = {"lm": {}, "dino": {}, "siglip": {}, "vq": {}}
    for k, v in sd.items():
        for name, prefix in (("dino", DINO), ("siglip", SIGLIP), ("vq", VQ)):
            if k.startswith(prefix):
                out[name][k[len(prefix) :]] = v
                break
        else:
            out["lm"][k] = v
    return out


def write_original_release(root: Path, lm: dict, dino: dict, siglip: dict, vq: dict, tokenizer) -> dict[str, Path]:
    """Write the published artefacts: `OmniMamba-tiny.pth` (LM + projector in fp16, tied copies as separate
    tensors), `timm-dinov2/model.safetensors`, `timm-siglip/open_clip_pytorch_model.bin` (`visual.trunk.*` plus
    text-tower entries), `vq_ds16_t2i.pt` (`{"model": ..., "steps": ..., "args": Namespace}`), `gpt-neox/`."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "checkpoint": root / "OmniMamba-tiny.pth",
        "dino": root / "timm-dinov2",
        "siglip": root / "timm-siglip",
        "vq": root / "vq_ds16_t2i.pt",
        "tokenizer": root / "gpt-neox",
    }
    release = {k: v.half().clone() for k, v in lm.items()}  # .clone(): the tied copies get their own storage
    assert release[f"{LM}lm_head.weight"].untyped_storage().data_ptr() != (
        release[f"{LM}backbone.embedding.weight"].untyped_storage().data_ptr()
    )
    torch.save(release, paths["checkpoint"])
    paths["dino"].mkdir()
    save_file({k: v.contiguous() for k, v in dino.items()}, str(paths["dino"] / "model.safetensors"))
    paths["siglip"].mkdir()
    open_clip = {f"visual.trunk.{k}": v for k, v in siglip.items()}
    open_clip.update({"text.token_embedding.weight": torch.zeros(5, 3), "logit_scale": torch.ones([]), "logit_bias": torch.zeros([])})
    torch.save(open_clip, paths["siglip"] / "open_clip_pytorch_model.bin")
    torch.save({"model": vq, "steps": 123, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=64)}, paths["vq"])
    tokenizer.save_pretrained(paths["tokenizer"])
    return paths
