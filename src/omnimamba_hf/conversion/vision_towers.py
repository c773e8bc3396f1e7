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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..modeling.configuration_omnimamba import OmniMambaVisionConfig
from ..modeling.vision_omnimamba import OmniMambaVisionModel

# One conversion rule: target keys, source keys, and a function from the source tensors to the target tensors.
Rule = tuple[tuple[str, ...], tuple[str, ...], Callable[..., tuple[torch.Tensor, ...]]]


def _same(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x,)


def _split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # timm's fused qkv Linear: output rows [q | k | v] (reshape(B, N, 3, heads, head_dim)).
    if x.shape[0] % 3:
        raise ValueError(f"fused qkv has {x.shape[0]} output rows, not a multiple of 3")
    return x.chunk(3, dim=0)


def _cat_rows(*xs: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.cat(xs, dim=0),)


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


def _linear(dst: str, src: str, bias: bool = True) -> list[Rule]:
    rules = [((f"{dst}.weight",), (f"{src}.weight",), _same)]
    if bias:
        rules.append(((f"{dst}.bias",), (f"{src}.bias",), _same))
    return rules


def _qkv(dst: str, src: str) -> list[Rule]:
    return [
        (tuple(f"{dst}.{p}_proj.{kind}" for p in "qkv"), (f"{src}.qkv.{kind}",), _split_qkv)
        for kind in ("weight", "bias")
    ]


def _target_shapes(config: OmniMambaVisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = OmniMambaVisionModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def _apply(rules: list[Rule], sd: Mapping[str, torch.Tensor], targets: dict[str, tuple[int, ...]], tower: str) -> dict:
    # Each source key in exactly one rule and each target key in exactly one rule (checks the rule table itself).
    sources = [s for _, srcs, _ in rules for s in srcs]
    produced = [t for dsts, _, _ in rules for t in dsts]
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
    for dsts, srcs, fn in rules:
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


def convert_timm_dino_state_dict(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """timm `vit_large_patch14_reg4_dinov2` → `OmniMambaVisionModel` keys `dino.*`.

    Position table: timm's has only patch rows (the class position is folded into `cls_token`); HF's has a class row
    first, which is set to zero so that HF's class token = timm's `cls_token`. A source table whose grid differs from
    the config's (37×37 for the raw 518-px weights) is resampled exactly as timm does at load time (spec §2.1, §9 #3).
    HF's `mask_token` (used only for masked pre-training) has no timm counterpart and is set to zero.
    """
    c = config.dino_config
    grid = c.image_size // c.patch_size

    def pos(table: torch.Tensor) -> tuple[torch.Tensor]:
        table = resample_dino_pos_embed(table, grid)
        return (torch.cat([table.new_zeros(1, 1, table.shape[-1]), table], dim=1),)

    e = "dino.embeddings"
    rules: list[Rule] = [
        ((f"{e}.cls_token",), ("cls_token",), _same),
        ((f"{e}.mask_token",), (), lambda: (torch.zeros(1, c.hidden_size, dtype=sd["cls_token"].dtype),)),
        ((f"{e}.position_embeddings",), ("pos_embed",), pos),
        ((f"{e}.register_tokens",), ("reg_token",), _same),
        *_linear(f"{e}.patch_embeddings.projection", "patch_embed.proj"),
    ]
    for i in range(c.num_hidden_layers):
        d, s = f"dino.encoder.layer.{i}", f"blocks.{i}"
        rules += [
            *_linear(f"{d}.norm1", f"{s}.norm1"),
            *_qkv(f"{d}.attention", f"{s}.attn"),
            *_linear(f"{d}.attention.o_proj", f"{s}.attn.proj"),
            ((f"{d}.layer_scale1.lambda1",), (f"{s}.ls1.gamma",), _same),
            *_linear(f"{d}.norm2", f"{s}.norm2"),
            *_linear(f"{d}.mlp.fc1", f"{s}.mlp.fc1"),
            *_linear(f"{d}.mlp.fc2", f"{s}.mlp.fc2"),
            ((f"{d}.layer_scale2.lambda1",), (f"{s}.ls2.gamma",), _same),
        ]
    rules += _linear("dino.layernorm", "norm")
    return _apply(rules, sd, _target_shapes(config, "dino."), "DINOv2")


def convert_timm_siglip_state_dict(
    sd: Mapping[str, torch.Tensor], config: OmniMambaVisionConfig
) -> dict[str, torch.Tensor]:
    """timm `vit_so400m_patch14_siglip_384` → `OmniMambaVisionModel` keys `siglip.*`.

    The native 27×27 table is copied (no resampling, spec §2.1). The unused `attn_pool` head maps onto HF's
    `head`: `latent` → `probe`, `q` ‖ `kv` → the `nn.MultiheadAttention` `in_proj` (rows q, k, v), `proj` →
    `out_proj`, `norm` → `layernorm`, `mlp` → `mlp`.
    """
    c = config.siglip_config
    e = "siglip.embeddings"
    rules: list[Rule] = [
        *_linear(f"{e}.patch_embedding", "patch_embed.proj"),
        ((f"{e}.position_embedding.weight",), ("pos_embed",), lambda t: (t.reshape(-1, t.shape[-1]),)),
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
            ((f"{h}.probe",), (f"{p}.latent",), _same),
            ((f"{h}.attention.in_proj_weight",), (f"{p}.q.weight", f"{p}.kv.weight"), _cat_rows),
            ((f"{h}.attention.in_proj_bias",), (f"{p}.q.bias", f"{p}.kv.bias"), _cat_rows),
            *_linear(f"{h}.attention.out_proj", f"{p}.proj"),
            *_linear(f"{h}.layernorm", f"{p}.norm"),
            *_linear(f"{h}.mlp.fc1", f"{p}.mlp.fc1"),
            *_linear(f"{h}.mlp.fc2", f"{p}.mlp.fc2"),
        ]
    return _apply(rules, sd, _target_shapes(config, "siglip."), "SigLIP")


__all__ = ["convert_timm_dino_state_dict", "convert_timm_siglip_state_dict", "resample_dino_pos_embed"]
