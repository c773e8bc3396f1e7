"""An independent, functional re-implementation of the ORIGINAL OmniMamba formulae on ORIGINAL-layout weights.

Used by `convert_omnimamba_weights_to_hf --verify` and by the tests as the oracle the converted model is compared with.
It deliberately shares no code with `omnimamba_hf.modeling` (and must never import it): every formula is written
from ORIGINAL-SPEC directly and reads the original key names.

* `lm`: the original OmniMamba state dict with full keys (`llm_backbone.mamba.*`, `projector.*`), as in
  `OmniMamba-1.3b.pth` (fp16 values are upcast on use);
* `dino`, `siglip`: timm `VisionTransformer` state dicts with keys relative to the tower (`blocks.{i}.attn.qkv.weight`);
  a DINOv2 position table on another grid (the 37×37 of the 518-px weights) is resampled like timm at load time;
* `vq`: a LlamaGen VQ state dict with bare keys (`encoder.conv_blocks.{l}.res.{j}...`).

Formulae (section numbers of ORIGINAL-SPEC): Mamba-2 per-timestep recurrence (§3.4), prenorm RMSNorm blocks with a
float32 residual (§3.2), task LoRA `x Wᵀ + (α/r)·B(A(x))` with α = 32 (§3.3), embedding layouts and position tables
(§3.5, §3.6, §4.2, §4.5), heads (§1.6), timm ViT intermediate features (§2.1), LlamaGen `decode_code` (§6).
Everything is computed in `dtype` (float64 in the tests; float32 is enough for `--verify`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

LM = "llm_backbone.mamba."
LORA_ALPHA = 32  # the original hard-codes r = 8, lora_alpha = 32 (§3.3); r is read from the tensors


def _w(sd: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    return sd[key].to(device=device, dtype=dtype)


# ---- Mamba-2 language model (§3.2 – §3.4) ----------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba2_mixer(lm: Mapping, layer: int, u: torch.Tensor, task: str, ngroups: int = 1) -> torch.Tensor:
    """One Mamba-2 mixer with the task LoRA on `in_proj`, as a plain loop over time steps. u: [B, L, d_model]."""
    p = f"{LM}backbone.layers.{layer}.mixer."
    dt_, dev = u.dtype, u.device
    W = _w(lm, p + "in_proj.weight", dt_, dev)
    A_lora = _w(lm, p + f"in_proj.{task}_lora_A0.weight", dt_, dev)
    B_lora = _w(lm, p + f"in_proj.{task}_lora_B0.weight", dt_, dev)
    scaling = LORA_ALPHA / A_lora.shape[0]
    zxbcdt = u @ W.T + scaling * ((u @ A_lora.T) @ B_lora.T)

    d_inner = lm[p + "norm.weight"].shape[0]
    nheads = lm[p + "dt_bias"].shape[0]
    headdim = d_inner // nheads
    conv_w = _w(lm, p + "conv1d.weight", dt_, dev)  # [conv_dim, 1, K]
    conv_dim, K = conv_w.shape[0], conv_w.shape[-1]
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    z, xBC, dt = zxbcdt.split([d_inner, conv_dim, nheads], dim=-1)

    # causal depthwise conv (left zero padding K-1), bias, SiLU
    Bsz, L, _ = u.shape
    xpad = F.pad(xBC.transpose(1, 2), (K - 1, 0))  # [B, C, K-1+L]
    windows = xpad.unfold(-1, K, 1)  # [B, C, L, K]
    conv = (windows * conv_w[:, 0][None, :, None, :]).sum(-1) + _w(lm, p + "conv1d.bias", dt_, dev)[None, :, None]
    xBC = F.silu(conv.transpose(1, 2))
    x, Bm, Cm = xBC.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x = x.reshape(Bsz, L, nheads, headdim)
    Bm = Bm.reshape(Bsz, L, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=2)
    Cm = Cm.reshape(Bsz, L, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=2)

    delta = F.softplus(dt + _w(lm, p + "dt_bias", dt_, dev))  # [B, L, H]
    A = -torch.exp(_w(lm, p + "A_log", dt_, dev))  # [H]
    D = _w(lm, p + "D", dt_, dev)
    h = torch.zeros(Bsz, nheads, headdim, d_state, dtype=dt_, device=dev)
    ys = []
    for t in range(L):  # h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t ;  y_t = h_t C_t + D x_t
        decay = torch.exp(delta[:, t] * A)[:, :, None, None]
        h = decay * h + (delta[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Cm[:, t]) + D[None, :, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(Bsz, L, d_inner)

    # gated RMSNorm, norm_before_gate=False, one normalisation group per ngroups
    g = (y * F.silu(z)).reshape(Bsz, L, ngroups, d_inner // ngroups)
    g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(Bsz, L, d_inner)
    g = g * _w(lm, p + "norm.weight", dt_, dev)
    return g @ _w(lm, p + "out_proj.weight", dt_, dev).T


def num_layers(lm: Mapping) -> int:
    prefix = f"{LM}backbone.layers."
    return len({k[len(prefix) :].split(".")[0] for k in lm if k.startswith(prefix)})


def mamba_backbone(lm: Mapping, embeds: torch.Tensor, task: str, ngroups: int = 1) -> torch.Tensor:
    """Blocks (Add → RMSNorm → Mixer, residual kept) and the final RMSNorm; embeds: [B, L, d] (position tables added)."""
    residual = embeds
    for i in range(num_layers(lm)):
        normed = rms_norm(residual, _w(lm, f"{LM}backbone.layers.{i}.norm.weight", embeds.dtype, embeds.device))
        residual = residual + mamba2_mixer(lm, i, normed, task, ngroups)
    return rms_norm(residual, _w(lm, f"{LM}backbone.norm_f.weight", embeds.dtype, embeds.device))


def fused_gelu_mlp(sd: Mapping, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """`FusedMLPProjector`: Linear → GELU(exact) → Linear → GELU → Linear, all with bias (`{prefix}.{0,2,4}`)."""
    lin = lambda t, i: F.linear(t, _w(sd, f"{prefix}.{i}.weight", x.dtype, x.device), _w(sd, f"{prefix}.{i}.bias", x.dtype, x.device))  # noqa: E731
    return lin(F.gelu(lin(F.gelu(lin(x, 0)), 2)), 4)


def text_embedding(lm: Mapping, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.embedding(ids, _w(lm, f"{LM}backbone.embedding.weight", dtype, ids.device))


def caption_embed(lm: Mapping, e: torch.Tensor) -> torch.Tensor:
    """`CaptionEmbedder.cap_proj`: fc2(GELU_tanh(fc1(e))), no biases (§3.5)."""
    p = f"{LM}backbone.caption_embed.cap_proj."
    h = F.gelu(e @ _w(lm, p + "fc1.weight", e.dtype, e.device).T, approximate="tanh")
    return h @ _w(lm, p + "fc2.weight", e.dtype, e.device).T


def image_token_embedding(lm: Mapping, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`GPT2Embeddings`: project_in(word_embeddings(code)) (§3.5)."""
    e = F.embedding(codes, _w(lm, f"{LM}backbone.img_embeddings.word_embeddings.weight", dtype, codes.device))
    return fused_gelu_mlp(lm, f"{LM}backbone.img_embeddings.project_in.projector", e)


def _head(lm: Mapping, name: str, tied_to: str, h: torch.Tensor) -> torch.Tensor:
    # The original ties the head to the table; the released file also stores the copy (identical). Use the copy
    # when it is there (it is the one `load_state_dict` writes last), else the table.
    key = f"{LM}{name}.weight" if f"{LM}{name}.weight" in lm else f"{LM}{tied_to}"
    return h @ _w(lm, key, h.dtype, h.device).T


# ---- vision towers (§2.1) --------------------------------------------------------------------------------------------


def timm_resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """timm `resample_abs_pos_embed` with no prefix rows: [1, g², C] → [1, grid², C], bicubic + antialias, in float32."""
    rows, C = pos_embed.shape[1], pos_embed.shape[2]
    side = int(math.isqrt(rows))
    if side == grid:
        return pos_embed
    t = pos_embed.float().reshape(1, side, side, C).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid * grid, C).to(pos_embed.dtype)


def timm_vit_block_output(
    sd: Mapping, pixels: torch.Tensor, *, num_heads: int, block: int, prefix_keys: Sequence[str] = ()
) -> torch.Tensor:
    """`get_intermediate_layers(x, n={block})[0]` of a timm ViT: patch embed, + pos_embed on the patch tokens only,
    prefix tokens (class, registers) prepended, pre-LN blocks (eps 1e-6, exact GELU, optional LayerScale) up to and
    including `block`, no final norm, prefix tokens removed."""
    dt_, dev = pixels.dtype, pixels.device
    w = _w(sd, "patch_embed.proj.weight", dt_, dev)
    x = F.conv2d(pixels, w, _w(sd, "patch_embed.proj.bias", dt_, dev), stride=w.shape[-1])
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = x + timm_resample_pos_embed(sd["pos_embed"], grid).to(dev, dt_)
    prefix = [_w(sd, k, dt_, dev).expand(x.shape[0], -1, -1) for k in prefix_keys]
    x = torch.cat(prefix + [x], dim=1)
    n_prefix = sum(t.shape[1] for t in prefix)
    B, N, C = x.shape
    hd = C // num_heads

    def lin(t, name):
        return F.linear(t, _w(sd, f"{name}.weight", dt_, dev), _w(sd, f"{name}.bias", dt_, dev))

    def ln(t, name):
        return F.layer_norm(t, (C,), _w(sd, f"{name}.weight", dt_, dev), _w(sd, f"{name}.bias", dt_, dev), eps=1e-6)

    for i in range(block + 1):
        b = f"blocks.{i}"
        qkv = lin(ln(x, f"{b}.norm1"), f"{b}.attn.qkv").reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        a = lin((attn @ v).transpose(1, 2).reshape(B, N, C), f"{b}.attn.proj")
        if f"{b}.ls1.gamma" in sd:
            a = a * _w(sd, f"{b}.ls1.gamma", dt_, dev)
        x = x + a
        m = lin(F.gelu(lin(ln(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        if f"{b}.ls2.gamma" in sd:
            m = m * _w(sd, f"{b}.ls2.gamma", dt_, dev)
        x = x + m
    return x[:, n_prefix:]


def _depth(sd: Mapping) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("blocks.")})


def vision_features(
    dino: Mapping, siglip: Mapping, dino_pixels: torch.Tensor, siglip_pixels: torch.Tensor,
    dino_heads: int, siglip_heads: int,
) -> torch.Tensor:  # fmt: skip
    """DinoSigLIP featurizer: DINOv2 block depth-2 ‖ SigLIP block depth-2 along channels (DINOv2 first)."""
    d = timm_vit_block_output(
        dino, dino_pixels, num_heads=dino_heads, block=_depth(dino) - 2, prefix_keys=("cls_token", "reg_token")
    )
    s = timm_vit_block_output(siglip, siglip_pixels, num_heads=siglip_heads, block=_depth(siglip) - 2)
    return torch.cat([d, s], dim=2)


# ---- the two tasks (§4.2, §4.5, §5.7) -------------------------------------------------------------------------------


def mmu_logits(
    lm: Mapping, dino: Mapping, siglip: Mapping, dino_pixels: torch.Tensor, siglip_pixels: torch.Tensor,
    prompt_ids: Sequence[int], ids: Mapping[str, int], *, dino_heads: int, siglip_heads: int,
    ngroups: int = 1, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # fmt: skip
    """MMU prefill of one image (pixels [3, S, S] per tower) and a tokenized prompt: the embedding sequence
    `emb(<|mmu|>), emb(<|soi|>), projector(features)…, emb(<|eoi|>), emb(<|sot|>), emb(prompt)…` + `mmu_pos_embed[:L]`,
    the `mmu` LoRA, `lm_head` → text logits [L, V_text] for every position (`ids`: `mmu`, `soi`, `eoi`, `sot`)."""
    dev = dino_pixels.device
    feats = vision_features(
        dino, siglip, dino_pixels[None].to(dtype), siglip_pixels[None].to(dtype), dino_heads, siglip_heads
    )
    image = fused_gelu_mlp(lm, "projector.projector", feats)[0]
    head = text_embedding(lm, torch.tensor([ids["mmu"], ids["soi"]], device=dev), dtype)
    tail = text_embedding(lm, torch.tensor([ids["eoi"], ids["sot"], *prompt_ids], device=dev), dtype)
    seq = torch.cat([head, image, tail], dim=0)
    seq = seq + _w(lm, f"{LM}backbone.mmu_pos_embed", dtype, dev)[0, : seq.shape[0]]
    hidden = mamba_backbone(lm, seq[None], "mmu", ngroups)[0]
    return _head(lm, "lm_head", "backbone.embedding.weight", hidden)


def t2i_prompt_ids(caption_ids: Sequence[int], caption_length: int, ids: Mapping[str, int]) -> list[int]:
    """`<|t2i|> <|sot|>` + the first `caption_length` caption ids right-aligned after `[PAD]`s + `<|eot|> <|soi|>`."""
    kept = list(caption_ids)[:caption_length]
    slots = [ids["pad"]] * (caption_length - len(kept)) + kept
    return [ids["t2i"], ids["sot"], *slots, ids["eot"], ids["soi"]]


def t2i_logits(
    lm: Mapping, prompt_ids: Sequence[int], image_codes: Sequence[int], *, ngroups: int = 1,
    dtype: torch.dtype = torch.float64, device=None,
) -> torch.Tensor:  # fmt: skip
    """T2I teacher-forced pass: `caption_embed(embedding(prompt))` ‖ `img_embeddings(codes)` + `pos_embed[:L]`, the
    `t2i` LoRA, `img_head` (the raw image-code table) → image logits [L, V_image] for every position."""
    text = caption_embed(lm, text_embedding(lm, torch.tensor(list(prompt_ids), device=device), dtype))
    parts = [text]
    if len(image_codes):
        parts.append(image_token_embedding(lm, torch.tensor(list(image_codes), device=device), dtype))
    seq = torch.cat(parts, dim=0)
    seq = seq + _w(lm, f"{LM}backbone.pos_embed", dtype, device)[0, : seq.shape[0]]
    hidden = mamba_backbone(lm, seq[None], "t2i", ngroups)[0]
    return _head(lm, "img_head", "backbone.img_embeddings.word_embeddings.weight", hidden)


# ---- LlamaGen VQ decode (§6.1, §6.2) ---------------------------------------------------------------------------------


def _gn(sd, p, x):
    return F.group_norm(x, 32, _w(sd, f"{p}.weight", x.dtype, x.device), _w(sd, f"{p}.bias", x.dtype, x.device), eps=1e-6)


def _conv(sd, p, x, padding=0):
    return F.conv2d(x, _w(sd, f"{p}.weight", x.dtype, x.device), _w(sd, f"{p}.bias", x.dtype, x.device), padding=padding)


def _resnet(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h)), padding=1)
    return (_conv(sd, f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(sd, p, x):
    h = _gn(sd, f"{p}.norm", x)
    b, c, hh, ww = x.shape
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in ("q", "k", "v"))
    w = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # [b, query, key]
    return x + _conv(sd, f"{p}.proj_out", (v @ w.transpose(1, 2)).reshape(b, c, hh, ww))


def vq_decode_code(vq: Mapping, codes: torch.Tensor, grid: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """LlamaGen `decode_code(codes [B, grid²], shape=[B, C, grid, grid])`: L2-normalised codebook rows →
    post_quant_conv → decoder (conv_in, mid, levels lowest resolution first with nearest ×2 upsampling, norm_out,
    swish, conv_out). Returns [B, 3, H, W], not clamped."""
    emb = F.normalize(_w(vq, "quantize.embedding.weight", dtype, codes.device), p=2, dim=-1)
    z = emb[codes.reshape(-1)].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    h = _conv(vq, "decoder.conv_in", _conv(vq, "post_quant_conv", z), padding=1)
    h = _resnet(vq, "decoder.mid.2", _attn(vq, "decoder.mid.1", _resnet(vq, "decoder.mid.0", h)))
    levels = len({k.split(".")[2] for k in vq if k.startswith("decoder.conv_blocks.")})
    for i in range(levels):
        p = f"decoder.conv_blocks.{i}"
        n_res = len({k.split(".")[4] for k in vq if k.startswith(f"{p}.res.")})
        for j in range(n_res):
            h = _resnet(vq, f"{p}.res.{j}", h)
            if f"{p}.attn.{j}.q.weight" in vq:
                h = _attn(vq, f"{p}.attn.{j}", h)
        if f"{p}.upsample.conv.weight" in vq:
            h = _conv(vq, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
    return _conv(vq, "decoder.conv_out", F.silu(_gn(vq, "decoder.norm_out", h)), padding=1)


__all__ = [
    "mamba2_mixer",
    "mamba_backbone",
    "mmu_logits",
    "t2i_logits",
    "t2i_prompt_ids",
    "timm_resample_pos_embed",
    "timm_vit_block_output",
    "vision_features",
    "vq_decode_code",
]
