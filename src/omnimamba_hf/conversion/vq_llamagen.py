"""LlamaGen VQ-16 checkpoint (`peizesun/llamagen_t2i/vq_ds16_t2i.pt`) → `OmniMambaVQVAE` state dict.

Key renaming per ORIGINAL-SPEC §6.4.3 / Appendix B (LlamaGen → Janus layout); `quantize.codebook_used` (a
training-only usage buffer, §6.2) is dropped. The conversion is strict: every source key is consumed exactly once,
every target key of `OmniMambaVQVAE(config).state_dict()` is produced exactly once, and shapes must match.

The reverse direction (`convert_vq_state_dict_to_llamagen`, used by `export_to_original`) renames with
`LLAMAGEN_VQ_INVERSE_RENAMES`, the rule-by-rule inverse of `LLAMAGEN_VQ_RENAMES`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..modeling.vq_omnimamba import OmniMambaVQVAE

# (pattern, replacement) applied in order; the first match wins. Leaf names are unchanged (§6.4.3).
LLAMAGEN_VQ_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.", r"encoder.down.\1.attn.\2."),
    (r"^encoder\.conv_blocks\.(\d+)\.downsample\.", r"encoder.down.\1.downsample."),
    # decoder: same level index order on both sides (0 = lowest resolution)
    (r"^decoder\.conv_blocks\.(\d+)\.res\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.", r"decoder.up.\1.attn.\2."),
    (r"^decoder\.conv_blocks\.(\d+)\.upsample\.", r"decoder.up.\1.upsample."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
)

# Source keys consumed without a target. Optional: LlamaGen's own `vq_ckpt` path pops it before loading (§1.9).
LLAMAGEN_VQ_DROPPED_KEYS: frozenset[str] = frozenset({"quantize.codebook_used"})
# LlamaGen's `VectorQuantizer(show_usage=True)` registers `codebook_used = zeros(65536)` whatever the codebook size.
LLAMAGEN_CODEBOOK_USED_SIZE = 65536


# `OmniMambaVQVAE` → LlamaGen names: the inverse of each rule of `LLAMAGEN_VQ_RENAMES`, in the same order.
# A rule missing here leaves a key in HF names: tests/test_export_original.py round-trips a LlamaGen state dict and
# compares the 1.3B export with the original's key table.
LLAMAGEN_VQ_INVERSE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.conv_blocks.\1.res.\2."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.", r"encoder.conv_blocks.\1.attn.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.conv_blocks.\1.downsample."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.conv_blocks.\1.res.\2."),
    (r"^decoder\.up\.(\d+)\.attn\.(\d+)\.", r"decoder.conv_blocks.\1.attn.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.conv_blocks.\1.upsample."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2."),
)

_MAX_NAMED = 20


def _rename_first_match(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def rename_llamagen_vq_key(key: str) -> str:
    """The `OmniMambaVQVAE` name of one LlamaGen VQ key (unchanged where no rule applies)."""
    return _rename_first_match(key, LLAMAGEN_VQ_RENAMES)


def llamagen_name_of_vq_key(key: str) -> str:
    """The LlamaGen name of one `OmniMambaVQVAE` key (the inverse of `rename_llamagen_vq_key`)."""
    return _rename_first_match(key, LLAMAGEN_VQ_INVERSE_RENAMES)


def unwrap_llamagen_checkpoint(obj) -> dict:
    """The state dict inside a loaded LlamaGen `.pt` (`{"model": state_dict, "optimizer": ..., ...}`), or `obj` itself
    when it already is a flat state dict of tensors."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return dict(obj["model"])
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(
        "Not a LlamaGen VQ checkpoint: expected a state dict of tensors or a dict holding one under 'model'; got "
        f"{type(obj).__name__} with keys {_names(obj.keys()) if isinstance(obj, Mapping) else 'n/a'}."
    )


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
    return ", ".join(keys[:_MAX_NAMED]) + more


def convert_llamagen_vq_state_dict(sd: Mapping, config) -> dict:
    """Map a LlamaGen VQ state dict (bare keys, as `vq_ds16_t2i.pt["model"]`) onto `OmniMambaVQVAE(config)`;
    `config` is an `OmniMambaVQVAEConfig` (or an `OmniMambaConfig`, whose `vq_config` is used).

    Tensors are passed through unchanged (no copy, same dtype). Raises `ValueError` naming the keys when a source key is
    unknown, a target key is missing or produced twice, or a shape differs.
    """
    config = getattr(config, "vq_config", config)  # accept the full OmniMambaConfig too
    with torch.device("meta"):  # target key set and shapes from the real module, without allocating it
        target = {k: tuple(v.shape) for k, v in OmniMambaVQVAE(config).state_dict().items()}

    out, sources_of, unexpected, mismatched = {}, {}, [], []
    for key, value in sd.items():
        if key in LLAMAGEN_VQ_DROPPED_KEYS:
            continue
        new = rename_llamagen_vq_key(key)
        if new not in target:
            unexpected.append(key)
            continue
        sources_of.setdefault(new, []).append(key)
        if tuple(value.shape) != target[new]:
            mismatched.append(f"{key} -> {new}: {tuple(value.shape)} vs expected {target[new]}")
        out[new] = value

    duplicated = [f"{t} <- {', '.join(s)}" for t, s in sources_of.items() if len(s) > 1]
    missing = [k for k in target if k not in out]
    problems = []
    if unexpected:
        problems.append(f"unexpected source keys (no OmniMambaVQVAE counterpart): {_names(unexpected)}")
    if missing:
        problems.append(f"target keys not produced (missing in the source): {_names(missing)}")
    if duplicated:
        problems.append(f"target keys produced more than once: {_names(duplicated)}")
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    if problems:
        raise ValueError("LlamaGen VQ conversion failed:\n  " + "\n  ".join(problems))
    return {k: out[k] for k in target}  # target (module) order


def convert_vq_state_dict_to_llamagen(sd: Mapping, config, *, codebook_used: bool = True) -> dict:
    """Inverse of `convert_llamagen_vq_state_dict`: an `OmniMambaVQVAE(config)` state dict → LlamaGen VQ names (as
    in `vq_ds16_t2i.pt["model"]` or an OmniMamba checkpoint's `llm_backbone.vqvae.*`). Tensors are passed through.

    With `codebook_used` (default) LlamaGen's usage buffer is added as `zeros(65536)`, the value of a fresh LlamaGen
    module (its training statistics are not kept by the HF model), so that the result loads strictly into LlamaGen's
    `VQModel`. Raises `ValueError` naming the keys when `sd` does not match `OmniMambaVQVAE(config)`.
    """
    config = getattr(config, "vq_config", config)
    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in OmniMambaVQVAE(config).state_dict().items()}
    problems = []
    if missing := [k for k in target if k not in sd]:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected := [k for k in sd if k not in target]:
        problems.append(f"unexpected keys (not in OmniMambaVQVAE): {_names(unexpected)}")
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs expected {t}" for k, t in target.items() if k in sd and sd[k].shape != t]
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    # the inverse table must really invert the forward one (guards against a forward rule added without its inverse)
    if unnamed := [k for k in target if rename_llamagen_vq_key(llamagen_name_of_vq_key(k)) != k]:
        problems.append(f"keys without a LlamaGen name (the inverse renaming does not invert): {_names(unnamed)}")
    if problems:
        raise ValueError("OmniMambaVQVAE → LlamaGen VQ export failed:\n  " + "\n  ".join(problems))
    out = {llamagen_name_of_vq_key(k): sd[k] for k in target}
    if codebook_used:
        out["quantize.codebook_used"] = torch.zeros(LLAMAGEN_CODEBOOK_USED_SIZE)
    return out


__all__ = [
    "convert_llamagen_vq_state_dict",
    "convert_vq_state_dict_to_llamagen",
    "llamagen_name_of_vq_key",
    "unwrap_llamagen_checkpoint",
    "rename_llamagen_vq_key",
    "LLAMAGEN_VQ_RENAMES",
    "LLAMAGEN_VQ_DROPPED_KEYS",
    "LLAMAGEN_VQ_INVERSE_RENAMES",
    "LLAMAGEN_CODEBOOK_USED_SIZE",
]
