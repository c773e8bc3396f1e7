"""Convert the original timm vision-tower weights into `OmniMambaVisionModel` state dicts (ORIGINAL-SPEC §2.1, §9,
Appendix A).

Inputs are timm `VisionTransformer` state dicts with keys relative to the tower (`blocks.{i}.attn.qkv.weight`, ...):
for DINOv2 the `timm/vit_large_patch14_reg4_dinov2.lvd142m` weights (native 37×37 table, or one already resampled to
the config grid, as in an OmniMamba checkpoint's `vision_backbone.dino_featurizer.*`), for SigLIP the `visual.trunk.*`
part of `timm/ViT-SO400M-14-SigLIP-384`. Strip any prefix before calling. Outputs are keyed relative to
`OmniMambaVisionModel` (`dino.*`, `siglip.*`) with the key names of the installed transformers modules, which are read
from a meta-device instance rather than hard-coded shapes, so a checkpoint either converts completely or raises.

Every source key is consumed exactly once and every target key produced exactly once; missing or unexpected keys and
shape mismatches raise a `ValueError` naming them.

The reverse direction (`convert_dino_state_dict_to_timm`, `convert_siglip_state_dict_to_timm`, used by
`export_to_original`) runs the same rule tables backwards, so the two directions cannot drift apart. It refuses what
timm has no place for: a non-zero DINOv2 `mask_token` or class row of the position table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..modeling.configuration_omnimamba import OmniMambaVisionConfig
from ..modeling.vision_omnimamba import OmniMambaVisionModel

# One conversion rule: target keys, source keys, a function from the source tensors to the target tensors, and its
# inverse (target tensors -> source tensors; raises ValueError where the target holds what the source cannot).
Fn = Callable[..., tuple[torch.Tensor, ...]]
Rule = tuple[tuple[str, ...], tuple[str, ...], Fn, Fn]


def _same(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x,)


def _split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # timm's fused qkv Linear: output rows [q | k | v] (reshape(B, N, 3, heads, head_dim)).
    if x.shape[0] % 3:
        raise ValueError(f"fused qkv has {x.shape[0]} output rows, not a multiple of 3")
    return x.chunk(3, dim=0)


def _cat_rows(*xs: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.cat(xs, dim=0),)


def _split_q_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # `nn.MultiheadAttention.in_proj_*` rows [q | k | v] back to timm's attention-pool `q` and fused `kv`.
    if x.shape[0] % 3:
        raise ValueError(f"in_proj has {x.shape[0]} rows, not a multiple of 3")
    width = x.shape[0] // 3
    return x[:width].clone(), x[width:].clone()


def _unsqueeze(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x[None],)


def _nonzero(x: torch.Tensor) -> bool:
    return not x.is_meta and bool(x.any())  # meta tensors (shapes only) have no values to lose


def resample_dino_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """timm's load-time `resample_abs_pos_embed` for a table without prefix rows (`no_embed_class=True`, spec §2.1):
    `[1, g*g, C]` → `[1, grid*grid, C]` by bicubic + antialias interpolation in float32, cast back. Same grid: as is."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, rows, C]; got {tuple(pos_embed.shape)}")
    rows, dim = pos_embed.shape[1], pos_embed.shape[2]
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"pos_embed has {rows} rows, not a square grid")
    if side == grid:
        return pos_embed
    table = pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)


def _copy(dst: str, src: str) -> Rule:
    return ((dst,), (src,), _same, _same)


def _linear(dst: str, src: str, bias: bool = True) -> list[Rule]:
    return [_copy(f"{dst}.{kind}", f"{src}.{kind}") for kind in (("weight", "bias") if bias else ("weight",))]


def _qkv(dst: str, src: str) -> list[Rule]:
    return [
        (tuple(f"{dst}.{p}_proj.{kind}" for p in "qkv"), (f"{src}.qkv.{kind}",), _split_qkv, _cat_rows)
        for kind in ("weight", "bias")
    ]


def _target_shapes(config: OmniMambaVisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = OmniMambaVisionModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def _apply(rules: list[Rule], sd: Mapping[str, torch.Tensor], targets: dict[str, tuple[int, ...]], tower: str) -> dict:
    # Each source key in exactly one rule and each target key in exactly one rule (checks the rule table itself).
    sources = [s for _, srcs, _, _ in rules for s in srcs]
    produced = [t for dsts, _, _, _ in rules for t in dsts]
    assert len(sources) == len(set(sources)) and len(produced) == len(set(produced)), "duplicate conversion rule"
    missing, unexpected = sorted(set(sources) - set(sd)), sorted(set(sd) - set(sources))
    if missing or unexpected:
        raise ValueError(
            f"timm {tower} state dict does not match the config: missing keys {missing}, unexpected keys {unexpected}"
        )
    # The rules must cover exactly the installed module's keys (guards against transformers key renames).
    if set(produced) != set(targets):
        raise ValueError(
            f"{tower} conversion rules do not match the installed transformers module: keys never produced "
            f"{sorted(set(targets) - set(produced))}, keys produced but absent {sorted(set(produced) - set(targets))}"
        )
    out, errors = {}, []
    for dsts, srcs, fn, _ in rules:
        try:
            values = fn(*(sd[s] for s in srcs))
        except (ValueError, RuntimeError) as e:
            errors.append(f"{list(srcs)}: {e}")
            continue
        for dst, value in zip(dsts, values):
            if tuple(value.shape) != targets[dst]:
                got = {s: tuple(sd[s].shape) for s in srcs}
                errors.append(f"{dst} <- {got}: converted shape {tuple(value.shape)}, expected {targets[dst]}")
            out[dst] = value.detach().clone().contiguous()  # own storage: safe for safetensors / load_state_dict
    if errors:
        raise ValueError(f"timm {tower} state dict has mis-shaped tensors:\n  " + "\n  ".join(errors))
    return out


def _apply_inverse(
    rules: list[Rule], sd: Mapping[str, torch.Tensor], targets: dict[str, tuple[int, ...]], tower: str
) -> dict[str, torch.Tensor]:
    # The rules run backwards: every HF key consumed exactly once, every timm key produced exactly once. Renamed
    # tensors are passed through (no copy); split / merged ones are new tensors.
    produced = [t for dsts, _, _, _ in rules for t in dsts]
    missing, unexpected = sorted(set(produced) - set(sd)), sorted(set(sd) - set(produced))
    if missing or unexpected:
        raise ValueError(
            f"{tower} state dict (OmniMambaVisionModel keys) does not match the config: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    mismatched = [f"{k}: {tuple(sd[k].shape)}, expected {targets[k]}" for k in produced if sd[k].shape != targets[k]]
    if mismatched:
        raise ValueError(f"{tower} state dict has mis-shaped tensors:\n  " + "\n  ".join(mismatched))
    out, errors = {}, []
    for dsts, srcs, _, inverse in rules:
        try:
            values = inverse(*(sd[d] for d in dsts))
        except ValueError as e:
            errors.append(str(e))
            continue
        assert len(values) == len(srcs), f"inverse rule for {dsts} returned {len(values)} tensors for {srcs}"
        out.update(zip(srcs, values))
    if errors:
        raise ValueError(f"The {tower} tower cannot be written in timm's layout without loss:\n  " + "\n  ".join(errors))
    return out


def _dino_rules(config: OmniMambaVisionConfig, dtype: torch.dtype = torch.float32) -> list[Rule]:
    c = config.dino_config
    grid = c.image_size // c.patch_size
    fix = "with torch.no_grad(): emb = model.model.vision_model.dino.embeddings; "

    def pos(table: torch.Tensor) -> tuple[torch.Tensor]:
        table = resample_dino_pos_embed(table, grid)
        return (torch.cat([table.new_zeros(1, 1, table.shape[-1]), table], dim=1),)

    def pos_back(table: torch.Tensor) -> tuple[torch.Tensor]:
        if _nonzero(table[:, 0]):
            raise ValueError(
                "dino.embeddings.position_embeddings has a non-zero class row [:, 0] (max |value| "
                f"{float(table[:, 0].abs().max()):.3g}); timm's DINOv2 has no position for the class token. Fold it "
                "into the class token first (the outputs stay the same): "
                f"`{fix}emb.cls_token += emb.position_embeddings[:, :1]; emb.position_embeddings[:, 0] = 0`."
            )
        return (table[:, 1:].clone(),)

    def mask_back(mask: torch.Tensor) -> tuple[()]:
        if _nonzero(mask):
            raise ValueError(
                f"dino.embeddings.mask_token is non-zero (max |value| {float(mask.abs().max()):.3g}); timm's DINOv2 "
                "has no mask token. It is used only with `bool_masked_pos` (masked-image pre-training), which "
                f"OmniMamba never passes: zero it to export (`{fix}emb.mask_token.zero_()`)."
            )
        return ()

    e = "dino.embeddings"
    rules: list[Rule] = [
        _copy(f"{e}.cls_token", "cls_token"),
        ((f"{e}.mask_token",), (), lambda: (torch.zeros(1, c.hidden_size, dtype=dtype),), mask_back),
        ((f"{e}.position_embeddings",), ("pos_embed",), pos, pos_back),
        _copy(f"{e}.register_tokens", "reg_token"),
        *_linear(f"{e}.patch_embeddings.projection", "patch_embed.proj"),
    ]
    for i in range(c.num_hidden_layers):
        d, s = f"dino.encoder.layer.{i}", f"blocks.{i}"
        rules += [
            *_linear(f"{d}.norm1", f"{s}.norm1"),
            *_qkv(f"{d}.attention", f"{s}.attn"),
            *_linear(f"{d}.attention.o_proj", f"{s}.attn.proj"),
            _copy(f"{d}.layer_scale1.lambda1", f"{s}.ls1.gamma"),
            *_linear(f"{d}.norm2", f"{s}.norm2"),
            *_linear(f"{d}.mlp.fc1", f"{s}.mlp.fc1"),
            *_linear(f"{d}.mlp.fc2", f"{s}.mlp.fc2"),
            _copy(f"{d}.layer_scale2.lambda1", f"{s}.ls2.gamma"),
        ]
    rules += _linear("dino.layernorm", "norm")
    return rules


def _siglip_rules(config: OmniMambaVisionConfig) -> list[Rule]:
    c = config.siglip_config
    e = "siglip.embeddings"
    rules: list[Rule] = [
        *_linear(f"{e}.patch_embedding", "patch_embed.proj"),
        ((f"{e}.position_embedding.weight",), ("pos_embed",), lambda t: (t.reshape(-1, t.shape[-1]),), _unsqueeze),
    ]
    for i in range(c.num_hidden_layers):
        d, s = f"siglip.encoder.layers.{i}", f"blocks.{i}"
        rules += [
            *_linear(f"{d}.layer_norm1", f"{s}.norm1"),
            *_qkv(f"{d}.self_attn", f"{s}.attn"),
            *_linear(f"{d}.self_attn.out_proj", f"{s}.attn.proj"),
            *_linear(f"{d}.layer_norm2", f"{s}.norm2"),
            *_linear(f"{d}.mlp.fc1", f"{s}.mlp.fc1"),
            *_linear(f"{d}.mlp.fc2", f"{s}.mlp.fc2"),
        ]
    rules += _linear("siglip.post_layernorm", "norm")
    if c.vision_use_head:
        h, p = "siglip.head", "attn_pool"
        rules += [
            _copy(f"{h}.probe", f"{p}.latent"),
            ((f"{h}.attention.in_proj_weight",), (f"{p}.q.weight", f"{p}.kv.weight"), _cat_rows, _split_q_kv),
            ((f"{h}.attention.in_proj_bias",), (f"{p}.q.bias", f"{p}.kv.bias"), _cat_rows, _split_q_kv),
            *_linear(f"{h}.attention.out_proj", f"{p}.proj"),
            *_linear(f"{h}.layernorm", f"{p}.norm"),
            *_linear(f"{h}.mlp.fc1", f"{p}.mlp.fc1"),
            *_linear(f"{h}.mlp.fc2", f"{p}.mlp.fc2"),
        ]
    return rules


def convert_timm_dino_state_dict(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """timm `vit_large_patch14_reg4_dinov2` → `OmniMambaVisionModel` keys `dino.*`.

    Position table: timm's has only patch rows (the class position is folded into `cls_token`); HF's has a class row
    first, which is set to zero so that HF's class token = timm's `cls_token`. A source table whose grid differs from
    the config's (37×37 for the raw 518-px weights) is resampled exactly as timm does at load time (spec §2.1, §9 #3).
    HF's `mask_token` (used only for masked pre-training) has no timm counterpart and is set to zero.
    """
    dtype = sd["cls_token"].dtype if "cls_token" in sd else torch.float32
    return _apply(_dino_rules(config, dtype), sd, _target_shapes(config, "dino."), "DINOv2")


def convert_timm_siglip_state_dict(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """timm `vit_so400m_patch14_siglip_384` → `OmniMambaVisionModel` keys `siglip.*`.

    The native 27×27 table is copied (no resampling, spec §2.1). The unused `attn_pool` head maps onto HF's
    `head`: `latent` → `probe`, `q` ‖ `kv` → the `nn.MultiheadAttention` `in_proj` (rows q, k, v), `proj` →
    `out_proj`, `norm` → `layernorm`, `mlp` → `mlp`.
    """
    return _apply(_siglip_rules(config), sd, _target_shapes(config, "siglip."), "SigLIP")


def convert_dino_state_dict_to_timm(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """Inverse of `convert_timm_dino_state_dict`: `OmniMambaVisionModel` keys `dino.*` → timm DINOv2 keys, with the
    position table at the config's grid (as an OmniMamba checkpoint's `vision_backbone.dino_featurizer.*` holds it).

    `q/k/v_proj` are concatenated back into `qkv`; the class row of the position table and `mask_token` are dropped,
    and must therefore be zero: otherwise a `ValueError` says how to fold / zero them (timm has no place for them).
    """
    return _apply_inverse(_dino_rules(config), sd, _target_shapes(config, "dino."), "DINOv2")


def convert_siglip_state_dict_to_timm(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """Inverse of `convert_timm_siglip_state_dict`: `OmniMambaVisionModel` keys `siglip.*` → timm SigLIP keys
    (`qkv` re-fused; the `head`'s `in_proj` split back into `attn_pool.q` and `attn_pool.kv`). Lossless."""
    return _apply_inverse(_siglip_rules(config), sd, _target_shapes(config, "siglip."), "SigLIP")


__all__ = [
    "convert_dino_state_dict_to_timm",
    "convert_siglip_state_dict_to_timm",
    "convert_timm_dino_state_dict",
    "convert_timm_siglip_state_dict",
    "resample_dino_pos_embed",
]
