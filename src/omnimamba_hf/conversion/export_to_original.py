"""Export an `OmniMambaForConditionalGeneration` back to the original OmniMamba release layout: the inverse of
`convert_omnimamba_weights_to_hf`.

    omnimamba-hf export-original MODEL_DIR OmniMamba.pth [--overwrite]

The result is a full original `OmniMamba.state_dict()` (ORIGINAL-SPEC Appendix A + B): `llm_backbone.mamba.*` and
`projector.*` through the converter's reverse table `HF_TO_ORIGINAL` (the tied `lm_head` / `img_head` aliases
included, sharing their source's storage), the towers under `vision_backbone.{dino,siglip}_featurizer.*` in timm
names (`vision_towers.convert_*_state_dict_to_timm`), the VQ under `llm_backbone.vqvae.*` in LlamaGen names
(`vq_llamagen.convert_vq_state_dict_to_llamagen`, with LlamaGen's zero `quantize.codebook_used` buffer). Converting
the file back (`omnimamba-hf convert --checkpoint OmniMamba.pth ...`) gives the same weights.

Every HF key is accounted for; what the original layout cannot hold raises a `ValueError` saying how to fix it rather
than being dropped: a non-zero DINOv2 `mask_token` or class row of the DINOv2 position table (timm has neither), or a
head that is not tied to its embedding (the original ties them).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import torch

from .convert_omnimamba_weights_to_hf import (
    _DELEGATE_TARGETS,
    DELEGATES,
    Tied,
    _names,
    hf_key_to_original,
    map_original_key,
    sigterm_as_keyboard_interrupt,
)
from .vision_towers import convert_dino_state_dict_to_timm, convert_siglip_state_dict_to_timm
from .vq_llamagen import convert_vq_state_dict_to_llamagen


def export_original_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of `model` (an `OmniMambaForConditionalGeneration`) under the original release's key names, the
    inverse of `convert_state_dict`. Tensors keep their dtype and, where only renamed, share memory with the model
    (clone before modifying them); fused tensors (`qkv`, `attn_pool.kv`) are new.

    Raises `ValueError` listing any HF key without an original name, a DINOv2 `mask_token` / position class row that
    is non-zero, or a head that differs from the embedding it is tied to in the original.
    """
    config = model.config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in DELEGATES}
    unnamed = []
    for key, value in sd.items():
        name = next((n for n, prefix in _DELEGATE_TARGETS.items() if key.startswith(prefix)), None)
        if name is not None:  # relative to the sub-model, as its converter returns it (`dino.*`, `siglip.*`, VQ keys)
            groups[name][key[len(DELEGATES[name][1]) :]] = value
        elif (original := hf_key_to_original(key)) is not None and _converts_back(original, key):
            out[original] = value
        else:
            unnamed.append(key)
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} keys of the model have no name in the original OmniMamba layout: {_names(unnamed)}. "
            "Only an unmodified OmniMambaForConditionalGeneration can be exported (merge or remove adapters first)."
        )
    # the original holds one tensor for each tied head: a head that differs from its source cannot be written
    untied = [
        f"{key} differs from {rule.source}"
        for key in out
        if isinstance(rule := map_original_key(key), Tied) and not _same(out[key], out[rule.source])
    ]
    if untied:
        raise ValueError(
            f"The original OmniMamba ties each output head to its embedding, but here {', '.join(untied)}. Export a "
            "model with tied heads (config.tie_word_embeddings=True, the released model's setting)."
        )
    towers = {
        "dino": convert_dino_state_dict_to_timm(groups["dino"], config.vision_config),
        "siglip": convert_siglip_state_dict_to_timm(groups["siglip"], config.vision_config),
        "vq": convert_vq_state_dict_to_llamagen(groups["vq"], config.vq_config),
    }
    for name, tower in towers.items():
        out.update({DELEGATES[name][0] + k: v for k, v in tower.items()})
    return out


def _converts_back(original: str, key: str) -> bool:
    # the converter's own table must map the name back (the reverse table alone also names e.g. unknown mixer keys)
    try:
        rule = map_original_key(original)
    except KeyError:
        return False
    return rule == key or isinstance(rule, Tied)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.is_meta or b.is_meta or torch.equal(a, b))


def save_original_checkpoint(model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `export_original_state_dict(model)` to `path` with `torch.save` (a `.pth` that
    `convert_omnimamba_checkpoint` and the original's `torch.load` read), atomically: into a temporary file in the
    same directory, flushed to disk, then `os.replace`d onto `path`; on any failure (Ctrl-C included) the temporary
    file is removed and `path` is left as it was. An existing `path` is replaced only with `overwrite`. Returns the
    absolute path."""
    path = Path(path).absolute()
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the path of the .pth file to write.")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    state = export_original_state_dict(model)  # refuses before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:  # exclusive create, permissions from the umask
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    """`omnimamba-hf export-original MODEL_DIR OUT.pth`: load in float32, export, save atomically."""
    parser = argparse.ArgumentParser(
        prog="omnimamba-hf export-original",
        description="Write an OmniMamba Hugging Face checkpoint back in the original release layout: one .pth holding "
        "a full OmniMamba.state_dict() (language model, projector, timm DINOv2/SigLIP towers, LlamaGen VQ).",
    )
    parser.add_argument("model", help="OmniMamba directory or Hub id (as written by `omnimamba-hf convert`)")
    parser.add_argument("output", help="the .pth file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    from omnimamba_hf import OmniMambaForConditionalGeneration

    if not os.path.isdir(args.model) and (os.path.isabs(args.model) or args.model.startswith((".", "~"))):
        print(f"omnimamba-hf export-original: {args.model}: no such model directory.", file=sys.stderr)
        return 1

    try:
        with sigterm_as_keyboard_interrupt():  # the temporary file is removed on SIGTERM too
            model = OmniMambaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
            path = save_original_checkpoint(model, args.output, overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        print(f"omnimamba-hf export-original: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {path} ({path.stat().st_size / 1e6:,.1f} MB): {args.model} in the original OmniMamba layout, float32")
    return 0


__all__ = ["export_original_state_dict", "save_original_checkpoint", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
