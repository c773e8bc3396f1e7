"""Convert the original OmniMamba release (arXiv 2503.08686) into a Hugging Face checkpoint directory.

Inputs (ORIGINAL-SPEC §1.9): the OmniMamba checkpoint (`OmniMamba-1.3b.pth`: `llm_backbone.mamba.*` + `projector.*`
in fp16 with the tied head copies saved separately; or a full `OmniMamba.state_dict()`), the two timm vision towers
(inside the checkpoint or as separate files/directories), the LlamaGen VQ checkpoint (`vq_ds16_t2i.pt`, a dict with
key `model`) and a GPT-NeoX-20B tokenizer directory. Output: a directory that `AutoModelForImageTextToText` /
`AutoProcessor` load (after `import omnimamba_hf`), written to a temporary sibling directory and moved into place only
when complete.

    python -m omnimamba_hf.conversion.convert_omnimamba_weights_to_hf \\
        --checkpoint OmniMamba-1.3b.pth --dino timm-dinov2/ --siglip timm-siglip/ --vq vq_ds16_t2i.pt \\
        --tokenizer gpt-neox-20b/ --output OmniMamba-1.3B-hf --verify

Every source key is consumed exactly once by the ordered `ORIGINAL_TO_HF` table (renamed, converted by the vision
tower / VQ converters, checked as a tied copy, or dropped on purpose) and every key of the target model is produced
exactly once; anything else raises a `ValueError` that names the keys. All sizes are read from the tensors; the few
quantities that shapes cannot determine (vision head counts, Mamba `n_groups`, the T2I caption length vs. VQ grid,
the vision input size) default to the released model's values and can be set explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..modeling.configuration_omnimamba import OmniMambaConfig
from ..processing.tokenization_omnimamba import token_ids_for_base_vocab
from .vision_towers import convert_timm_dino_state_dict, convert_timm_siglip_state_dict
from .vq_llamagen import convert_llamagen_vq_state_dict, unwrap_llamagen_checkpoint

logger = logging.getLogger("omnimamba_hf.conversion")

PAPER_URL = "https://arxiv.org/abs/2503.08686"
ORIGINAL_REPO = "hustvl/OmniMamba"
_MAX_NAMED = 25  # keys named per problem in an error message (the count of the rest follows)

# ---- the key map ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tied:
    """The key is an alias of `source` in the original (same Parameter): checked equal to it, not stored."""

    source: str


@dataclasses.dataclass(frozen=True)
class Delegate:
    """The key belongs to a sub-model converted as a whole by its own strict converter (prefix stripped)."""

    name: str  # "dino" | "siglip" | "vq"


_M = r"llm_backbone\.mamba\."
_L = r"^llm_backbone\.mamba\.backbone\.layers\.(\d+)\."
_LM_HF = "model.language_model."

# Ordered: the first matching pattern decides. A `str` is a `re.sub` replacement, `None` drops the key on purpose.
ORIGINAL_TO_HF: dict[str, str | None | Tied | Delegate] = {
    # -- Mamba-2 language model (transformers' Mamba2 names, spec §9 #6) ---------------------------------------------
    rf"^{_M}backbone\.embedding\.weight$": f"{_LM_HF}embeddings.weight",
    rf"{_L}norm\.weight$": rf"{_LM_HF}layers.\1.norm.weight",
    rf"{_L}mixer\.in_proj\.(mmu|t2i)_lora_A0\.weight$": rf"{_LM_HF}layers.\1.mixer.in_proj.task_adapters.\2.down.weight",
    rf"{_L}mixer\.in_proj\.(mmu|t2i)_lora_B0\.weight$": rf"{_LM_HF}layers.\1.mixer.in_proj.task_adapters.\2.up.weight",
    rf"{_L}mixer\.(dt_bias|A_log|D|in_proj\.weight|conv1d\.weight|conv1d\.bias|norm\.weight|out_proj\.weight)$": (
        rf"{_LM_HF}layers.\1.mixer.\2"
    ),
    rf"^{_M}backbone\.norm_f\.weight$": f"{_LM_HF}norm_f.weight",
    # -- OmniMamba's task-specific input paths (spec §3.5, §3.6) -----------------------------------------------------
    rf"^{_M}backbone\.mmu_pos_embed$": "model.mmu_position_embeddings",
    rf"^{_M}backbone\.pos_embed$": "model.t2i_position_embeddings",
    rf"^{_M}backbone\.img_embeddings\.word_embeddings\.weight$": "model.image_embeddings.embeddings.weight",
    rf"^{_M}backbone\.img_embeddings\.project_in\.projector\.0\.(weight|bias)$": r"model.image_embeddings.mlp.linear_1.\1",
    rf"^{_M}backbone\.img_embeddings\.project_in\.projector\.2\.(weight|bias)$": r"model.image_embeddings.mlp.linear_2.\1",
    rf"^{_M}backbone\.img_embeddings\.project_in\.projector\.4\.(weight|bias)$": r"model.image_embeddings.mlp.linear_3.\1",
    rf"^{_M}backbone\.caption_embed\.cap_proj\.(fc1|fc2)\.weight$": r"model.caption_mlp.\1.weight",
    r"^projector\.projector\.0\.(weight|bias)$": r"model.projector.linear_1.\1",
    r"^projector\.projector\.2\.(weight|bias)$": r"model.projector.linear_2.\1",
    r"^projector\.projector\.4\.(weight|bias)$": r"model.projector.linear_3.\1",
    # -- tied aliases (spec §1.6): must equal their source, re-tied by the model, not stored ------------------------
    rf"^{_M}lm_head\.weight$": Tied("llm_backbone.mamba.backbone.embedding.weight"),
    rf"^{_M}img_head\.weight$": Tied("llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight"),
    # -- sub-models with their own strict converters -------------------------------------------------------------------
    r"^vision_backbone\.dino_featurizer\.": Delegate("dino"),  # vision_towers.convert_timm_dino_state_dict
    r"^vision_backbone\.siglip_featurizer\.": Delegate("siglip"),  # vision_towers.convert_timm_siglip_state_dict
    r"^llm_backbone\.vqvae\.quantize\.codebook_used$": None,  # LlamaGen's training-only usage buffer (§6.2)
    r"^llm_backbone\.vqvae\.": Delegate("vq"),  # vq_llamagen.convert_llamagen_vq_state_dict
}

# Prefix of each delegated group in the original layout, where its converter's output goes (the converters of the
# towers return keys starting with `dino.` / `siglip.`), and its name in messages.
DELEGATES = {
    "dino": ("vision_backbone.dino_featurizer.", "model.vision_model.", "DINOv2 tower"),
    "siglip": ("vision_backbone.siglip_featurizer.", "model.vision_model.", "SigLIP tower"),
    "vq": ("llm_backbone.vqvae.", "model.vqmodel.", "LlamaGen VQ"),
}
_DELEGATE_TARGETS = {"dino": "model.vision_model.dino.", "siglip": "model.vision_model.siglip.", "vq": "model.vqmodel."}

# Reverse of the renaming rules (HF key → original key), for naming missing sources and for the reverse direction.
HF_TO_ORIGINAL: dict[str, str] = {
    r"^model\.language_model\.embeddings\.weight$": "llm_backbone.mamba.backbone.embedding.weight",
    r"^model\.language_model\.layers\.(\d+)\.norm\.weight$": r"llm_backbone.mamba.backbone.layers.\1.norm.weight",
    r"^model\.language_model\.layers\.(\d+)\.mixer\.in_proj\.task_adapters\.(mmu|t2i)\.down\.weight$": (
        r"llm_backbone.mamba.backbone.layers.\1.mixer.in_proj.\2_lora_A0.weight"
    ),
    r"^model\.language_model\.layers\.(\d+)\.mixer\.in_proj\.task_adapters\.(mmu|t2i)\.up\.weight$": (
        r"llm_backbone.mamba.backbone.layers.\1.mixer.in_proj.\2_lora_B0.weight"
    ),
    r"^model\.language_model\.layers\.(\d+)\.mixer\.(.+)$": r"llm_backbone.mamba.backbone.layers.\1.mixer.\2",
    r"^model\.language_model\.norm_f\.weight$": "llm_backbone.mamba.backbone.norm_f.weight",
    r"^model\.mmu_position_embeddings$": "llm_backbone.mamba.backbone.mmu_pos_embed",
    r"^model\.t2i_position_embeddings$": "llm_backbone.mamba.backbone.pos_embed",
    r"^model\.image_embeddings\.embeddings\.weight$": "llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight",
    r"^model\.image_embeddings\.mlp\.linear_1\.(weight|bias)$": r"llm_backbone.mamba.backbone.img_embeddings.project_in.projector.0.\1",
    r"^model\.image_embeddings\.mlp\.linear_2\.(weight|bias)$": r"llm_backbone.mamba.backbone.img_embeddings.project_in.projector.2.\1",
    r"^model\.image_embeddings\.mlp\.linear_3\.(weight|bias)$": r"llm_backbone.mamba.backbone.img_embeddings.project_in.projector.4.\1",
    r"^model\.caption_mlp\.(fc1|fc2)\.weight$": r"llm_backbone.mamba.backbone.caption_embed.cap_proj.\1.weight",
    r"^model\.projector\.linear_1\.(weight|bias)$": r"projector.projector.0.\1",
    r"^model\.projector\.linear_2\.(weight|bias)$": r"projector.projector.2.\1",
    r"^model\.projector\.linear_3\.(weight|bias)$": r"projector.projector.4.\1",
    r"^lm_head\.weight$": "llm_backbone.mamba.lm_head.weight",
    r"^image_head\.weight$": "llm_backbone.mamba.img_head.weight",
}

_COMPILED = [(re.compile(p), t) for p, t in ORIGINAL_TO_HF.items()]
_COMPILED_REVERSE = [(re.compile(p), t) for p, t in HF_TO_ORIGINAL.items()]

# Modules that exist only with one task enabled (spec §1.2): their absence identifies a stage-1 checkpoint.
_T2I_ONLY = (
    "llm_backbone.mamba.backbone.pos_embed",
    "llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight",
    "llm_backbone.mamba.backbone.caption_embed.cap_proj.fc1.weight",
)
_MMU_ONLY = ("llm_backbone.mamba.backbone.mmu_pos_embed", "projector.projector.0.weight")


def map_original_key(key: str) -> str | None | Tied | Delegate:
    """The rule of `ORIGINAL_TO_HF` for one original key: the HF key (`str`), `None` (dropped on purpose), a `Tied` or
    a `Delegate` marker. Raises `KeyError` if no rule matches."""
    for pattern, target in _COMPILED:
        if pattern.search(key):
            return pattern.sub(target, key) if isinstance(target, str) else target
    raise KeyError(key)


def hf_key_to_original(key: str) -> str | None:
    """The original name of an HF key of the language model / projector / heads (None for sub-model keys)."""
    for pattern, target in _COMPILED_REVERSE:
        if pattern.search(key):
            return pattern.sub(target, key)
    return None


def _names(keys, limit: int = _MAX_NAMED) -> str:
    keys = list(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def _stage1_hint(keys) -> str:
    keys = set(keys)
    has_t2i = any(k in keys for k in _T2I_ONLY)
    has_mmu = any(k in keys for k in _MMU_ONLY)
    if has_t2i and not has_mmu:
        return (
            " The checkpoint has the T2I modules but no MMU modules (mmu_pos_embed, projector): it looks like a "
            "stage-1 T2I checkpoint (config_stage1_t2i.yaml, t2i_task only). Only complete two-task (stage-2 / "
            "released) checkpoints are converted: a stage-1 checkpoint would leave modules at random values."
        )
    if has_mmu and not has_t2i:
        return (
            " The checkpoint has the MMU modules but no T2I modules (pos_embed, img_embeddings, caption_embed): it "
            "looks like a stage-1 MMU checkpoint (config_stage1_mmu.yaml, mmu_task only). Only complete two-task "
            "(stage-2 / released) checkpoints are converted: a stage-1 checkpoint would leave modules at random values."
        )
    return ""


def _describe(keys) -> str:
    """A guess of what a wrongly passed file is, from its keys (for error messages)."""
    keys = list(keys)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if has("model.language_model.") or has("model.vision_model."):  # first: it holds a VQ's keys too
        return "it looks like an already converted Hugging Face OmniMamba checkpoint (load it with from_pretrained)"
    if has("encoder.conv_blocks.") or has("quantize.embedding.weight"):
        return "it looks like a LlamaGen VQ state dict (pass it with --vq)"
    if has("attn_pool.") and has("blocks.0.attn.qkv"):
        return "it looks like a timm SigLIP tower (pass it with --siglip)"
    if has("reg_token") and has("blocks.0.attn.qkv"):
        return "it looks like a timm DINOv2 tower (pass it with --dino)"
    if (has("backbone.embeddings.weight") or has("backbone.embedding.weight")) and not has("llm_backbone."):
        return "it looks like a plain Mamba/Mamba-2 language model, not an OmniMamba checkpoint"
    return "it is not an OmniMamba checkpoint"


# ---- reading the inputs --------------------------------------------------------------------------------------------

_DIR_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def resolve_weights_path(path: str | os.PathLike) -> Path:
    """A weights file, or the weights file inside a directory (HF/timm/open_clip names first, else the only
    `*.safetensors` / `*.pth` / `*.pt` / `*.bin` file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    if path.is_file():
        return path
    for name in _DIR_CANDIDATES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path} holds no weights file (*.safetensors, *.pth, *.pt, *.bin).")
    raise ValueError(f"{path} holds several weights files, pass one of them explicitly: {_names(p.name for p in found)}.")


def _load_one_file(path: Path):
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        import argparse as _argparse  # LlamaGen checkpoints may pickle their training `args` (a Namespace)

        with torch.serialization.safe_globals([_argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every reader error becomes one precise message
        size = path.stat().st_size if path.exists() else 0
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            reason = "a zip archive (torch.save format) without its central directory"
        raise ValueError(
            f"Cannot read {path} ({size:,} bytes): {reason}."
            " The file is truncated, corrupt, not a PyTorch/safetensors checkpoint, or holds objects that "
            "torch.load(weights_only=True) refuses to unpickle."
        ) from e


def load_checkpoint_object(path: str | os.PathLike):
    """Read a `.safetensors` file, a sharded index (`*.index.json`), or a `.pth`/`.bin`/`.pt` pickle with
    `torch.load(weights_only=True, map_location="cpu")`; a directory is resolved with `resolve_weights_path`."""
    path = resolve_weights_path(path)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"Cannot read the shard index {path}: {e}.") from e
        out = {}
        for shard in dict.fromkeys(weight_map.values()):
            part = _load_one_file(path.parent / shard)
            out.update(part)
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{path} lists tensors that its shards do not hold: {_names(missing)}.")
        return out
    return _load_one_file(path)


def as_state_dict(obj, what: str) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict from a loaded checkpoint: the object itself, or the state dict stored under a
    single wrapper key (`model`, `state_dict`, `module`). Anything else raises."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if obj and not bad:
            return dict(obj)
        raise ValueError(
            f"{what} is not a state dict: entries that are not tensors: {_names(bad)} (and no 'model' / 'state_dict' "
            "entry holding one)."
        )
    raise ValueError(f"{what} is not a state dict but a {type(obj).__name__}.")


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    from tqdm.auto import tqdm

    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress
    ) as bar:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


# ---- gathering the original weights into one canonical layout --------------------------------------------------------


@dataclasses.dataclass
class OriginalWeights:
    """All original weights under their full original names (`llm_backbone.mamba.*`, `projector.*`,
    `vision_backbone.{dino,siglip}_featurizer.*`, `llm_backbone.vqvae.*`), whichever file they came from."""

    state_dict: dict[str, torch.Tensor]
    sources: dict[str, str]  # group ("lm", "dino", "siglip", "vq") -> where it came from
    ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # input -> keys outside the model

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """`lm` (full keys) or a sub-model (`dino`, `siglip`, `vq`) with its prefix stripped (reference layout)."""
        if name == "lm":
            return {k: v for k, v in self.state_dict.items() if k.startswith(("llm_backbone.mamba.", "projector."))}
        prefix = DELEGATES[name][0]
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def _strip_tower_prefix(sd: dict, name: str, source: str) -> tuple[dict, list[str]]:
    """Bring a separately given tower/VQ state dict to bare keys. Accepted: bare keys; the original's full prefix;
    for SigLIP an open_clip checkpoint (`visual.trunk.*`; its other entries — the text tower, logit scale/bias — are
    not part of OmniMamba and are ignored, as timm's own loader does)."""
    full_prefix = DELEGATES[name][0]
    if name == "vq":
        full_prefix = "llm_backbone.vqvae."
    if any(k.startswith(full_prefix) for k in sd):
        outside = [k for k in sd if not k.startswith(full_prefix)]
        if outside:
            raise ValueError(
                f"{source}: mixes keys under {full_prefix!r} with other keys: {_names(outside)}."
            )
        return {k[len(full_prefix) :]: v for k, v in sd.items()}, []
    if name == "siglip" and any(k.startswith("visual.trunk.") for k in sd):
        ignored = [k for k in sd if not k.startswith("visual.trunk.")]
        return {k[len("visual.trunk.") :]: v for k, v in sd.items() if k.startswith("visual.trunk.")}, ignored
    return dict(sd), []


# A key each sub-model must have and keys it must not have: catches files passed for the wrong input.
_SIGNATURES = {
    "dino": (("cls_token", "reg_token", "blocks.0.attn.qkv.weight"), ("attn_pool.latent",)),
    "siglip": (("pos_embed", "blocks.0.attn.qkv.weight"), ("cls_token", "reg_token")),
    "vq": (("quantize.embedding.weight", "encoder.conv_in.weight"), ()),
}


def _check_identity(bare: Mapping, name: str, src: str) -> None:
    need, forbidden = _SIGNATURES[name]
    title = DELEGATES[name][2]
    if any(k not in bare for k in need) or any(k in bare for k in forbidden):
        raise ValueError(
            f"{src} was given as the {title} but is not one (expected keys {list(need)}"
            + (f" and none of {list(forbidden)}" if forbidden else "")
            + f"; first keys: {_names(list(bare)[:6])}): {_describe(bare)}."
        )


def gather_original_weights(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    dino: Mapping[str, torch.Tensor] | None = None,
    siglip: Mapping[str, torch.Tensor] | None = None,
    vq: Mapping | None = None,
    sources: Mapping[str, str] | None = None,
) -> OriginalWeights:
    """Merge the OmniMamba checkpoint with separately given towers / VQ into the canonical original layout.

    Raises `ValueError` when a sub-model is missing (in neither the checkpoint nor a separate input), given twice, or
    when the checkpoint holds no OmniMamba language model."""
    sources = dict(sources or {})
    sd = dict(checkpoint)
    ckpt_name = sources.get("checkpoint", "the checkpoint")
    if not any(k.startswith("llm_backbone.mamba.") for k in sd):
        raise ValueError(
            f"{ckpt_name} holds no OmniMamba language model (no 'llm_backbone.mamba.*' keys; first keys: "
            f"{_names(list(sd)[:8])}): {_describe(sd)}."
        )
    out_sources = {"lm": ckpt_name}
    ignored = {}
    for name, given in (("dino", dino), ("siglip", siglip), ("vq", vq)):
        prefix, _, title = DELEGATES[name]
        inside = any(k.startswith(prefix) for k in sd)
        src = sources.get(name, f"the separate {title} input")
        if given is not None:
            if inside:
                raise ValueError(
                    f"The {title} is given twice: {ckpt_name} already holds '{prefix}*' keys and {src} was passed as "
                    "well. Pass only one."
                )
            if name == "vq":
                given = unwrap_llamagen_checkpoint(given)
            bare, dropped = _strip_tower_prefix(dict(given), name, src)
            if dropped:
                ignored[src] = dropped
            _check_identity(bare, name, src)
            sd.update({prefix + k: v for k, v in bare.items()})
            out_sources[name] = src
        elif inside:
            out_sources[name] = ckpt_name
            _check_identity({k[len(prefix) :]: None for k in sd if k.startswith(prefix)}, name, f"{ckpt_name} ({prefix}*)")
        else:
            flag = {"dino": "--dino", "siglip": "--siglip", "vq": "--vq"}[name]
            what = {
                "dino": "timm vit_large_patch14_reg4_dinov2.lvd142m weights",
                "siglip": "timm vit_so400m_patch14_siglip_384 weights",
                "vq": "LlamaGen vq_ds16_t2i.pt",
            }[name]
            raise ValueError(
                f"The {title} is missing: {ckpt_name} has no '{prefix}*' keys (the released OmniMamba-1.3b.pth holds "
                f"only the language model and projector) and no separate input was given. Pass the {what} with {flag}."
            )
    return OriginalWeights(sd, out_sources, ignored)


def load_original_weights(
    checkpoint: str | os.PathLike,
    *,
    dino: str | os.PathLike | None = None,
    siglip: str | os.PathLike | None = None,
    vq: str | os.PathLike | None = None,
) -> OriginalWeights:
    """Read the input files (see `load_checkpoint_object`) and gather them (see `gather_original_weights`)."""
    sources = {"checkpoint": str(checkpoint)}
    ckpt = as_state_dict(load_checkpoint_object(checkpoint), str(checkpoint))
    parts = {}
    for name, path in (("dino", dino), ("siglip", siglip), ("vq", vq)):
        if path is None:
            continue
        obj = load_checkpoint_object(path)
        parts[name] = obj if name == "vq" else as_state_dict(obj, str(path))
        sources[name] = str(path)
    return gather_original_weights(ckpt, sources=sources, **parts)


# ---- configuration from the tensors ---------------------------------------------------------------------------------


def _require(sd: Mapping, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"Missing key {key!r}: needed to read the model size.{_stage1_hint(sd)}")
    return sd[key]


def _indices(sd: Mapping, prefix: str, what: str) -> int:
    """Number of consecutive indices `{prefix}{i}.` (0 … n-1); a gap raises."""
    found = sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})
    if not found:
        raise ValueError(f"No '{prefix}{{i}}.*' keys: the {what} is missing.{_stage1_hint(sd)}")
    if found != list(range(len(found))):
        gaps = sorted(set(range(found[-1] + 1)) - set(found))
        raise ValueError(f"The {what} has indices {found[0]}…{found[-1]} but lacks {prefix}{{{_names(gaps)}}}.*")
    return len(found)


def _deep_update(base: dict, update: Mapping) -> dict:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
            base[k] = _deep_update(dict(base[k]), v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _geometry(config: OmniMambaConfig) -> dict:
    """The depths a conversion reads from the layer indices (recorded in the report, compared with the release)."""
    vision = config.vision_config
    return {
        "mamba_layers": config.text_config.num_hidden_layers,
        "dinov2_blocks": vision.dino_config.num_hidden_layers,
        "siglip_blocks": vision.siglip_config.num_hidden_layers,
    }


def _check_override_keys(overrides: Mapping, known: Mapping, path: str = "") -> None:
    """Refuse config-override keys that OmniMambaConfig (or the sub-config at that level) does not have: a typo would
    otherwise be written into config.json and silently ignored."""
    import difflib

    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config-overrides: {path + key!r} is not an OmniMambaConfig field.{hint}")
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            _check_override_keys(value, known[key], f"{path}{key}.")


def token_ids_from_tokenizer(tokenizer) -> dict:
    """Special-token ids and text vocabulary size for the checkpoint, from the base GPT-NeoX tokenizer (ids follow
    `token_ids_for_base_vocab(len(tokenizer))`, ORIGINAL-SPEC §1.4) or from an already extended OmniMamba tokenizer."""
    from ..processing.tokenization_omnimamba import special_token_ids

    present = special_token_ids(tokenizer)
    if all(v is not None for v in present.values()):  # already an OmniMamba tokenizer
        ids = dict(present)
        ids["text_vocab_size"] = -(-len(tokenizer) // 16) * 16
        base = ids["pad_token_id"]  # [PAD] is the first id after the base vocabulary
    elif all(v is None for v in present.values()):
        base = len(tokenizer)
        ids = token_ids_for_base_vocab(base)
    else:
        raise ValueError(
            "The tokenizer has some but not all OmniMamba tokens ([PAD], <|soi|> … <|lvg|>, <image>): "
            f"{ {k: v for k, v in present.items()} }. Pass the plain GPT-NeoX-20B tokenizer."
        )
    ids["eos_token_id"] = tokenizer.eos_token_id
    ids["base_vocab_size"] = base
    return ids


def infer_config_from_state_dict(
    original: OriginalWeights | Mapping[str, torch.Tensor],
    *,
    token_ids: Mapping | None = None,
    t2i_caption_length: int | None = None,
    image_size: int | None = None,
    dino_num_attention_heads: int | None = None,
    siglip_num_attention_heads: int | None = None,
    mamba_n_groups: int = 1,
    overrides: Mapping | None = None,
) -> OmniMambaConfig:
    """Build the `OmniMambaConfig` of an original checkpoint from its tensor shapes (any size, not only 1.3B).

    Read from the tensors: d_model and text vocabulary (`embedding`), layer count, d_inner (`mixer.norm`), heads
    (`dt_bias`; head_dim = d_inner / heads), conv width and kernel (`conv1d`), n_groups·d_state (conv width − d_inner,
    checked against the `in_proj` width), LoRA rank, image vocabulary and MLP widths, projector width, position-table
    rows, vision tower widths/depths/MLP widths/patch size/grid/register count, and the whole VQ geometry.

    Not determined by shapes (defaults = the released model): `mamba_n_groups` (1; d_state = (conv − d_inner) /
    (2·n_groups)); `t2i_caption_length` (68; the T2I table has caption + 4 + grid² + 1 rows, so the VQ grid follows);
    `image_size` (384 for the released 27×27-patch / 14-px towers, otherwise grid·patch); the ViT head counts (width / 64
    for DINOv2, 16 for the 1152-wide SigLIP-SO400M, width / 64 otherwise). `token_ids` come from
    `token_ids_from_tokenizer`; without them the released GPT-NeoX-20B arithmetic (base vocabulary = rows − 11) is
    assumed. `overrides` is a nested dict applied last (`{"vision_config": {"dino_config": {...}}}`).
    """
    sd = original.state_dict if isinstance(original, OriginalWeights) else dict(original)
    lm = "llm_backbone.mamba.backbone."

    # -- language model
    emb = _require(sd, lm + "embedding.weight")
    vocab, d_model = emb.shape
    n_layer = _indices(sd, lm + "layers.", "Mamba layer stack")
    m = lm + "layers.0.mixer."
    d_inner = _require(sd, m + "norm.weight").shape[0]
    nheads = _require(sd, m + "dt_bias").shape[0]
    conv_w = _require(sd, m + "conv1d.weight")
    conv_dim, d_conv = conv_w.shape[0], conv_w.shape[-1]
    in_proj_rows = _require(sd, m + "in_proj.weight").shape[0]
    rank = _require(sd, m + "in_proj.mmu_lora_A0.weight").shape[0]
    if d_inner % nheads:
        raise ValueError(f"{m}norm.weight has {d_inner} channels, not a multiple of the {nheads} heads ({m}dt_bias).")
    gs2 = conv_dim - d_inner  # 2 · n_groups · d_state
    if gs2 <= 0 or gs2 % (2 * mamba_n_groups):
        raise ValueError(
            f"{m}conv1d.weight has {conv_dim} channels; minus d_inner={d_inner} this is not 2·n_groups·d_state with "
            f"n_groups={mamba_n_groups}."
        )
    d_state = gs2 // (2 * mamba_n_groups)
    if in_proj_rows != 2 * d_inner + gs2 + nheads:
        raise ValueError(
            f"{m}in_proj.weight has {in_proj_rows} output rows, but z ‖ xBC ‖ dt needs 2·{d_inner} + {gs2} + {nheads} = "
            f"{2 * d_inner + gs2 + nheads} (a Mamba-2 mixer without MLP split)."
        )
    if d_inner % d_model:
        raise ValueError(f"d_inner={d_inner} is not a multiple of d_model={d_model} (expand must be an integer).")

    # -- task paths
    image_vocab, _ = _require(sd, lm + "img_embeddings.word_embeddings.weight").shape
    img_mlp = _require(sd, lm + "img_embeddings.project_in.projector.0.weight").shape[0]
    proj_hidden, vision_dim = _require(sd, "projector.projector.0.weight").shape
    mmu_rows = _require(sd, lm + "mmu_pos_embed").shape[1]
    t2i_rows = _require(sd, lm + "pos_embed").shape[1]

    # -- vision towers (timm layouts)
    dp, sp = DELEGATES["dino"][0], DELEGATES["siglip"][0]
    d_hidden = _require(sd, dp + "cls_token").shape[-1]
    d_depth = _indices(sd, dp + "blocks.", "DINOv2 block stack")
    d_patch = _require(sd, dp + "patch_embed.proj.weight").shape[-1]
    d_regs = _require(sd, dp + "reg_token").shape[1]
    d_mlp = _require(sd, dp + "blocks.0.mlp.fc1.weight").shape[0]
    s_hidden = _require(sd, sp + "pos_embed").shape[-1]
    s_rows = sd[sp + "pos_embed"].shape[1]
    s_depth = _indices(sd, sp + "blocks.", "SigLIP block stack")
    s_patch = _require(sd, sp + "patch_embed.proj.weight").shape[-1]
    s_mlp = _require(sd, sp + "blocks.0.mlp.fc1.weight").shape[0]
    grid = math.isqrt(s_rows)
    if grid * grid != s_rows:
        raise ValueError(f"{sp}pos_embed has {s_rows} rows, not a square patch grid.")
    if d_patch != s_patch:
        raise ValueError(f"The towers' patch sizes differ: DINOv2 {d_patch}, SigLIP {s_patch}.")
    if vision_dim != d_hidden + s_hidden:
        raise ValueError(
            f"projector.projector.0.weight takes {vision_dim} features but the towers give {d_hidden} + {s_hidden}."
        )
    if image_size is None:
        image_size = 384 if (grid, s_patch) == (27, 14) else grid * s_patch  # released: timm img_size=384 (§2.1)
    if image_size // s_patch != grid:
        raise ValueError(f"image_size={image_size} gives a {image_size // s_patch}-patch grid, the towers have {grid}.")

    def heads(width, given, default_rule, name):
        n = given if given is not None else default_rule(width)
        if not n or width % n:
            raise ValueError(
                f"Cannot infer the {name} attention-head count for width {width}; pass it explicitly "
                f"(--{name.lower()}-heads)."
            )
        return n

    d_heads = heads(d_hidden, dino_num_attention_heads, lambda w: w // 64 if w % 64 == 0 else None, "DINO")
    s_heads = heads(
        s_hidden, siglip_num_attention_heads, lambda w: 16 if w == 1152 else (w // 64 if w % 64 == 0 else None), "SigLIP"
    )

    # -- VQ (LlamaGen layout)
    vp = DELEGATES["vq"][0]
    base_ch, in_ch = _require(sd, vp + "encoder.conv_in.weight").shape[:2]
    levels = _indices(sd, vp + "encoder.conv_blocks.", "VQ encoder")
    mult = []
    for lvl in range(levels):
        width = _require(sd, vp + f"encoder.conv_blocks.{lvl}.res.0.conv1.weight").shape[0]
        if width % base_ch:
            raise ValueError(f"VQ level {lvl} has width {width}, not a multiple of conv_in's {base_ch}.")
        mult.append(width // base_ch)
    n_res = _indices(sd, vp + "encoder.conv_blocks.0.res.", "VQ encoder level 0")
    latent = _require(sd, vp + "encoder.conv_out.weight").shape[0]
    codebook, embed_dim = _require(sd, vp + "quantize.embedding.weight").shape
    out_ch = _require(sd, vp + "decoder.conv_out.weight").shape[0]
    if image_vocab != codebook:
        raise ValueError(
            f"{lm}img_embeddings.word_embeddings.weight has {image_vocab} rows but the VQ codebook "
            f"({vp}quantize.embedding.weight) has {codebook} codes: the image vocabulary must be the codebook."
        )

    # -- T2I layout: rows = caption + 4 (t2i, sot, eot, soi) + grid² image tokens + 1 (eoi)
    cap = 68 if t2i_caption_length is None else t2i_caption_length
    grid2 = t2i_rows - cap - 5
    vq_grid = math.isqrt(max(grid2, 0))
    if grid2 <= 0 or vq_grid * vq_grid != grid2:
        raise ValueError(
            f"llm_backbone.mamba.backbone.pos_embed has {t2i_rows} rows = caption + 4 + grid² + 1; with "
            f"t2i_caption_length={cap} the VQ grid is not an integer square. Pass the caption length explicitly."
        )

    # -- token ids
    if token_ids is None:
        token_ids = token_ids_for_base_vocab(vocab - 11)
        token_ids = {**token_ids, "eos_token_id": 0}
    if token_ids["text_vocab_size"] != vocab:
        raise ValueError(
            f"The tokenizer implies {token_ids['text_vocab_size']} text-embedding rows (base vocabulary "
            f"{token_ids.get('base_vocab_size', '?')} + [PAD] + 9 task tokens + <image>, padded to 16) but "
            f"llm_backbone.mamba.backbone.embedding.weight has {vocab}: wrong tokenizer?"
        )
    id_fields = ("image_token_id", "pad_token_id", "soi_token_id", "eoi_token_id", "sot_token_id", "eot_token_id",
                 "t2i_token_id", "mmu_token_id", "eos_token_id")  # fmt: skip
    kwargs = dict(
        text_config={
            "hidden_size": d_model,
            "num_hidden_layers": n_layer,
            "state_size": d_state,
            "conv_kernel": d_conv,
            "expand": d_inner // d_model,
            "head_dim": d_inner // nheads,
            "num_heads": nheads,
            "n_groups": mamba_n_groups,
            "vocab_size": vocab,
            "use_conv_bias": f"{m}conv1d.bias" in sd,
            "pad_token_id": token_ids["pad_token_id"],
            "eos_token_id": token_ids["eos_token_id"],
        },
        vision_config={
            "dino_config": {
                "hidden_size": d_hidden,
                "num_hidden_layers": d_depth,
                "num_attention_heads": d_heads,
                "mlp_ratio": d_mlp // d_hidden if d_mlp % d_hidden == 0 else d_mlp / d_hidden,
                "image_size": image_size,
                "patch_size": d_patch,
                "num_register_tokens": d_regs,
            },
            "siglip_config": {
                "hidden_size": s_hidden,
                "intermediate_size": s_mlp,
                "num_hidden_layers": s_depth,
                "num_attention_heads": s_heads,
                "image_size": image_size,
                "patch_size": s_patch,
                "vision_use_head": any(k.startswith(sp + "attn_pool.") for k in sd),
            },
        },
        vq_config={
            "embed_dim": embed_dim,
            "num_embeddings": codebook,
            "latent_channels": latent,
            "base_channels": base_ch,
            "channel_multiplier": mult,
            "num_res_blocks": n_res,
            "in_channels": in_ch,
            "out_channels": out_ch,
            "num_patches": vq_grid,
            "image_size": vq_grid * 2 ** (levels - 1),
        },
        projector_intermediate_size=proj_hidden,
        image_embedding_intermediate_size=img_mlp,
        num_image_tokens=grid * grid,
        mmu_max_position_embeddings=mmu_rows,
        t2i_max_position_embeddings=t2i_rows,
        t2i_caption_length=cap,
        task_lora_rank=rank,
        **{k: token_ids[k] for k in id_fields},
    )
    if overrides:
        _check_override_keys(overrides, OmniMambaConfig().to_dict())
        kwargs = _deep_update(kwargs, overrides)
    try:
        return OmniMambaConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"The sizes read from the checkpoint do not form a valid OmniMambaConfig: {e}") from e


# ---- the conversion -------------------------------------------------------------------------------------------------


def _empty_model(config: OmniMambaConfig):
    from accelerate import init_empty_weights

    from ..modeling.modeling_omnimamba import OmniMambaForConditionalGeneration

    with init_empty_weights():  # parameters on meta, buffers real (CONVENTIONS §4.4)
        return OmniMambaForConditionalGeneration(config)


def tied_target_keys(model) -> dict[str, str]:
    return dict(getattr(model, "_tied_weights_keys", None) or {})


def target_key_shapes(config: OmniMambaConfig) -> dict[str, tuple[int, ...]]:
    """Key → shape of the state dict the converter must produce (the model's, minus the tied heads)."""
    model = _empty_model(config)
    tied = tied_target_keys(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def _same_values(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("nan")
    if a.is_meta or b.is_meta:
        return True, 0.0
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if torch.equal(a, b):
        return True, 0.0
    return False, float((a.float() - b.float()).abs().max())


def convert_state_dict(
    original: OriginalWeights | Mapping[str, torch.Tensor],
    config: OmniMambaConfig,
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Map the canonical original state dict onto `OmniMambaForConditionalGeneration(config)` keys.

    Each key goes through the first matching `ORIGINAL_TO_HF` rule: renamed (tensor passed through, no copy), dropped
    on purpose (`None`), checked as a tied alias (must be bitwise equal to its source after promotion to the wider
    dtype; not stored, the model re-ties), or collected for a sub-model converter (DINOv2 / SigLIP / VQ, each strict).
    Raises one `ValueError` naming every unmatched source key, target key produced twice, target key not produced
    (with its original name), shape mismatch and tied-copy mismatch. Returns the tensors in the model's key order,
    without the tied heads; dtypes are unchanged (cast with `cast_state_dict`).
    """
    from tqdm.auto import tqdm

    sd = original.state_dict if isinstance(original, OriginalWeights) else dict(original)
    sources = original.sources if isinstance(original, OriginalWeights) else {}
    targets = target_key_shapes(config)

    produced: dict[str, list[str]] = {}
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in DELEGATES}
    unmatched, tied_problems, dropped = [], [], []
    for key in tqdm(sd, desc="mapping keys", disable=not progress, leave=False):
        try:
            rule = map_original_key(key)
        except KeyError:
            unmatched.append(key)
            continue
        if rule is None:
            dropped.append(key)
        elif isinstance(rule, Tied):
            if rule.source in sd:
                same, diff = _same_values(sd[key], sd[rule.source])
                if not same:
                    tied_problems.append(
                        f"{key} {tuple(sd[key].shape)} differs from {rule.source} {tuple(sd[rule.source].shape)}"
                        + ("" if math.isnan(diff) else f" (max |diff| {diff:.3g})")
                    )
        elif isinstance(rule, Delegate):
            groups[rule.name][key[len(DELEGATES[rule.name][0]) :]] = sd[key]
        else:
            produced.setdefault(rule, []).append(key)
            out[rule] = sd[key]

    problems = []
    # sub-models (only when present: absence is reported as missing targets below)
    converters = {
        "dino": lambda g: convert_timm_dino_state_dict(g, config.vision_config),
        "siglip": lambda g: convert_timm_siglip_state_dict(g, config.vision_config),
        "vq": lambda g: convert_llamagen_vq_state_dict(g, config.vq_config),
    }
    reported = []  # target subtrees whose problems are already described by their sub-model
    for name, group in groups.items():
        prefix, target_prefix, title = DELEGATES[name]
        if not group:
            problems.append(f"the {title} is missing: no '{prefix}*' keys")
            reported.append(_DELEGATE_TARGETS[name])
            continue
        try:
            converted = converters[name](group)
        except ValueError as e:
            where = sources.get(name, "the checkpoint")
            problems.append(f"{title} (original keys '{prefix}*', from {where}; key names below are relative): {e}")
            reported.append(_DELEGATE_TARGETS[name])
            continue
        for k, v in converted.items():
            produced.setdefault(target_prefix + k, []).append(f"{prefix}*")
            out[target_prefix + k] = v

    unexpected = unmatched + [src for tgt, srcs in produced.items() if tgt not in targets for src in srcs]
    duplicated = [f"{t} <- {', '.join(s)}" for t, s in produced.items() if len(s) > 1]
    missing = [t for t in targets if t not in produced and not t.startswith(tuple(reported))]
    mismatched = [
        f"{', '.join(produced[t])} -> {t}: {tuple(out[t].shape)}, expected {targets[t]}"
        for t in produced
        if t in targets and tuple(out[t].shape) != targets[t]
    ]
    if unexpected:
        problems.append(f"unexpected source keys (no OmniMamba counterpart): {_names(unexpected)}")
    if missing:
        named = [f"{hf_key_to_original(t) or t} (-> {t})" for t in missing]
        problems.append(f"missing source keys: {_names(named)}.{_stage1_hint(sd)}")
    if duplicated:
        problems.append(f"target keys produced more than once: {_names(duplicated)}")
    if mismatched:
        problems.append(f"shape mismatches (the sizes were read from the other tensors): {_names(mismatched)}")
    if tied_problems:
        problems.append(
            "tied copies differ from their source (the original ties these tensors, so a released file stores equal "
            f"copies; refusing to choose one): {_names(tied_problems)}"
        )
    if problems:
        raise ValueError("OmniMamba checkpoint conversion failed:\n  " + "\n  ".join(problems))
    logger.info("dropped on purpose: %s", _names(dropped) or "nothing")
    return {k: out[k] for k in targets}


def cast_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype` (others unchanged), contiguous; the only place values change."""
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()
    }


def build_model(config: OmniMambaConfig, state_dict: Mapping[str, torch.Tensor]):
    """`OmniMambaForConditionalGeneration` on meta, loaded with `load_state_dict(strict=True, assign=True)`, re-tied."""
    model = _empty_model(config)
    full = dict(state_dict)
    for head, source in tied_target_keys(model).items():
        full[head] = full[source]
    model.load_state_dict(full, strict=True, assign=True)
    model.tie_weights()
    for head, source in tied_target_keys(model).items():
        if model.get_parameter(head) is not model.get_parameter(source):
            raise RuntimeError(f"{head} is not tied to {source} after loading.")
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {_names(leftover)}")
    return model.eval()


# ---- auxiliary files ---------------------------------------------------------------------------------------------


def make_generation_config(config: OmniMambaConfig):
    """The original's decoding defaults (spec §5.4, §5.5): greedy for both tasks (`do_sample=False`; T2I through
    `generate(..., generation_mode="image")` uses the same config and always yields the VQ grid² tokens, no CFG), stop
    at `<|endoftext|>` (eos 0), pad `[PAD]`."""
    try:
        from ..modeling.generation_omnimamba import omnimamba_generation_config

        gen = omnimamba_generation_config(config)
    except ImportError:
        from transformers import GenerationConfig

        gen = GenerationConfig(max_length=config.mmu_max_position_embeddings + 1)
    gen.do_sample = False
    gen.eos_token_id = config.eos_token_id
    gen.pad_token_id = config.pad_token_id
    gen.bos_token_id = None
    return gen


def model_card(config: OmniMambaConfig, report: dict, base_model: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license="mit",
        tags=["omnimamba", "mamba2", "multimodal", "text-to-image", "image-text-to-text", "arxiv:2503.08686"],
        paper=PAPER_URL,
    )
    t = config.text_config
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# OmniMamba (Hugging Face format)",
        "",
        f"OmniMamba ([arXiv:2503.08686]({PAPER_URL})): one Mamba-2 language model for multimodal understanding "
        "(image + text → text) and text-to-image generation (text → 256 LlamaGen VQ tokens), with decoupled "
        "vocabularies and task-specific LoRA. Converted from the original release "
        f"([{ORIGINAL_REPO}](https://huggingface.co/{ORIGINAL_REPO})) by `omnimamba_hf`'s "
        "`convert_omnimamba_weights_to_hf`.",
        "",
        f"* language model: {t.num_hidden_layers} Mamba-2 layers, d_model {t.hidden_size}, "
        f"{t.num_heads} heads × {t.head_dim}, d_state {t.state_size}, text vocabulary {config.text_vocab_size}",
        f"* image vocabulary {config.image_vocab_size} (VQ grid {config.vq_config.num_patches}²), "
        f"{config.num_image_tokens} vision tokens per MMU image",
        f"* weights dtype: {report['dtype']}",
        "",
        "## Usage",
        "",
        "```python",
        "import omnimamba_hf  # registers OmniMamba with the Auto classes",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        "model = AutoModelForImageTextToText.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)",
        "# understanding (greedy, stops at <|endoftext|>)",
        'inputs = processor(images=image, text="USER: Please describe it in detail. ASSISTANT:")',
        "text = processor.batch_decode(model.generate(**inputs, max_new_tokens=64), skip_special_tokens=True)",
        "# text-to-image (greedy, 256 tokens)",
        't2i = processor(text=["a red bicycle leaning against a wall"], generation_mode="image")',
        'codes = model.generate(**t2i, generation_mode="image")',
        "pixels = model.decode_image_tokens(codes)",
        "```",
        "",
        "## Conversion",
        "",
        "```json",
        json.dumps(report, indent=1),
        "```",
        "",
    ]
    return ModelCard("\n".join(lines)).content


# ---- atomic output ---------------------------------------------------------------------------------------------------


CONVERSION_REPORT = "conversion_report.json"  # also what marks a directory as a conversion that --overwrite may replace


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on normal exit move it to `final` with `os.replace` (an
    existing `final` is swapped out only with `overwrite`); on any exception, KeyboardInterrupt included, delete it
    (and any parent directories this call created) and re-raise. Nothing half-written is ever left at `final`."""
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise ValueError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it.")
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not (final / CONVERSION_REPORT).is_file():
        raise ValueError(
            f"{final} is not empty and is not an earlier conversion (no {CONVERSION_REPORT}): --overwrite only "
            "replaces a converted directory. Choose a new output directory, or remove this one yourself."
        )
    created = []
    for parent in reversed(final.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the permissions of any new directory
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise ValueError(f"{final} appeared while converting; not replacing it.")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rmdir(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


# ---- verification ---------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VERIFY_DTYPES = {"float64": torch.float64, "float32": torch.float32}


_VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def verify_conversion(
    model_dir: str | os.PathLike,
    original: OriginalWeights,
    *,
    converted: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    rtol: float | None = None,
    seed: int = 0,
    num_image_codes: int | None = None,
    progress: bool = False,
) -> dict:
    """Reload `model_dir` with the Auto classes and compare it with `conversion.reference`, an independent
    implementation of the original formulae run on the ORIGINAL-layout weights:

    * `weights`: every reloaded tensor equals the converted one (exact);
    * `mmu_logits`: a random image + prompt through the saved processor, all positions' text logits;
    * `t2i_logits`: the fixed T2I prompt + teacher-forced image codes, all positions' image logits;
    * `vq_decode`: pixels decoded from random codes.

    Both sides compute in `dtype` (float64 by default: the comparison then isolates conversion errors from float32
    rounding, which 48 layers amplify to ~1e-4 relative; float64 needs about 8 bytes per parameter of memory), with
    the model's pure-PyTorch Mamba path (mamba-ssm's Triton kernels compute in TF32) and TF32 off. The reference sees
    the original weights rounded to the saved dtype, so only mapping errors count. A check passes when
    max |hf − ref| ≤ rtol · max(1, max |ref|) (default rtol: 1e-6 in float64, 1e-3 in float32); on failure a
    `ValueError` lists the differences. Returns `{check: {"max_abs_diff": …, "max_abs_ref": …, "passed": …}}`.
    """
    import numpy as np
    import PIL.Image
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import omnimamba_hf  # noqa: F401 - registers the Auto classes

    from . import reference as ref

    rtol = _VERIFY_RTOL.get(dtype, 1e-3) if rtol is None else rtol
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    config = model.config
    saved_dtype = next((t.dtype for t in (converted or {}).values() if t.is_floating_point()), None)
    if saved_dtype is None:
        saved_dtype = getattr(config, "dtype", None) or torch.float32
        saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    results = {}
    steps = tqdm(total=4, desc="verify", disable=not progress)

    # 0. the weights themselves
    if converted is not None:
        reloaded = model.state_dict()
        bad = []
        for k, v in converted.items():
            r = reloaded[k].detach()
            if r.shape != v.shape or not torch.equal(r, v.to(r.dtype)):
                bad.append(k)
        results["weights"] = {"tensors": len(converted), "differing": len(bad), "passed": not bad}
        if bad:
            raise ValueError(f"Reloaded tensors differ from the converted ones: {_names(bad)}")
        del reloaded
    model = model.to(device=device, dtype=dtype)
    steps.update()

    def rounded(sd):
        if saved_dtype == torch.float32:
            return sd
        return {k: (v.to(saved_dtype) if v.is_floating_point() else v) for k, v in sd.items()}

    dino = original.group("dino")
    if saved_dtype != torch.float32:  # round what the original module holds: the table after timm's load-time resample
        grid = config.vision_config.image_size // config.vision_config.dino_config.patch_size
        dino = {**dino, "pos_embed": ref.timm_resample_pos_embed(dino["pos_embed"], grid)}
    lm, dino, siglip, vq = (rounded(g) for g in (original.group("lm"), dino, original.group("siglip"), original.group("vq")))
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    ids = {n: vocab[s] for n, s in (("mmu", "<|mmu|>"), ("soi", "<|soi|>"), ("eoi", "<|eoi|>"), ("sot", "<|sot|>"),
                                    ("eot", "<|eot|>"), ("t2i", "<|t2i|>"), ("pad", "[PAD]"))}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def record(name, hf, want):
        hf, want = hf.detach().double().cpu(), want.detach().double().cpu()
        diff = float((hf - want).abs().max())
        scale = float(want.abs().max())
        results[name] = {
            "max_abs_diff": diff,
            "max_abs_ref": scale,
            "shape": list(want.shape),
            "passed": diff <= rtol * max(1.0, scale),
        }
        print(f"[verify] {name:11s} shape {tuple(want.shape)}  max|hf - original| = {diff:.3e}  (max|original| {scale:.3g})")

    with torch.no_grad(), _no_tf32(), _pytorch_mamba_path():
        # 1. MMU
        size = config.vision_config.image_size
        image = PIL.Image.fromarray(rng.integers(0, 256, (size + 13, size + 7, 3), dtype=np.uint8))
        prompt = "USER: Please describe it in detail. ASSISTANT:"
        inputs = processor(images=image, text=processor.image_token + prompt, return_tensors="pt")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        layout = [ids["mmu"], ids["soi"]] + [config.image_token_id] * config.num_image_tokens
        layout += [ids["eoi"], ids["sot"], *prompt_ids]
        if inputs["input_ids"][0].tolist() != layout:
            raise ValueError("The saved processor does not build the original MMU layout for a single image + prompt.")
        pv = inputs["pixel_values"][0]
        hf = model(**{k: v.to(device) for k, v in inputs.items()}).logits[0]
        want = ref.mmu_logits(
            lm, dino, siglip, pv[0].to(device), pv[1].to(device), prompt_ids, ids,
            dino_heads=config.vision_config.dino_config.num_attention_heads,
            siglip_heads=config.vision_config.siglip_config.num_attention_heads,
            ngroups=config.text_config.n_groups, dtype=dtype,
        )  # fmt: skip
        record("mmu_logits", hf, want)
        steps.update()

        # 2. T2I (teacher forced)
        caption = "a red bicycle leaning against a wall"
        with warnings.catch_warnings():  # a caption longer than the slots is truncated, as the original does
            warnings.simplefilter("ignore")
            t2i = processor(text=[caption], generation_mode="image", return_tensors="pt")
        want_prompt = ref.t2i_prompt_ids(tok(caption, add_special_tokens=False)["input_ids"], config.t2i_caption_length, ids)
        if t2i["input_ids"][0].tolist() != want_prompt:
            raise ValueError("The saved processor does not build the original fixed-length T2I prompt.")
        n_codes = config.num_generated_image_tokens if num_image_codes is None else num_image_codes
        codes = torch.randint(0, config.image_vocab_size, (n_codes,), generator=gen)
        hf_ids = torch.cat([t2i["input_ids"][0], codes + config.text_vocab_size])[None].to(device)
        hf = model(input_ids=hf_ids, task="t2i").logits[0]
        want = ref.t2i_logits(lm, want_prompt, codes.tolist(), ngroups=config.text_config.n_groups,
                              dtype=dtype, device=device)  # fmt: skip
        record("t2i_logits", hf, want)
        steps.update()

        # 3. VQ decode
        grid = config.vq_config.num_patches
        codes = torch.randint(0, config.image_vocab_size, (1, grid * grid), generator=gen)
        hf = model.model.vqmodel.decode_codes(codes.to(device))
        want = ref.vq_decode_code(vq, codes.to(device), grid, dtype=dtype)
        record("vq_decode", hf, want)
        steps.update()
    steps.close()
    failed = [n for n, r in results.items() if not r["passed"]]
    if failed:
        raise ValueError(
            f"Verification failed for {failed} ({str(dtype).removeprefix('torch.')}, tolerance {rtol:g} relative to "
            "max(1, max|ref|)): "
            + json.dumps({n: results[n] for n in failed})
        )
    return results


@contextlib.contextmanager
def _pytorch_mamba_path():
    """Run the model's pure-PyTorch Mamba-2 path while verifying (the Triton kernels compute in TF32 and take no
    float64), by the modeling's documented switch `OMNIMAMBA_DISABLE_KERNELS`."""
    from ..modeling import mixer_omnimamba

    clear = getattr(getattr(mixer_omnimamba, "mamba_kernels", None), "cache_clear", lambda: None)
    saved = os.environ.get("OMNIMAMBA_DISABLE_KERNELS")
    os.environ["OMNIMAMBA_DISABLE_KERNELS"] = "1"
    clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMNIMAMBA_DISABLE_KERNELS", None)
        else:
            os.environ["OMNIMAMBA_DISABLE_KERNELS"] = saved
        clear()


@contextlib.contextmanager
def _no_tf32():
    """Full float32 matmuls/convolutions while verifying (cuDNN defaults to TF32 for convolutions)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the whole pipeline ---------------------------------------------------------------------------------------------


def _load_base_tokenizer(tokenizer):
    if tokenizer is None:
        raise ValueError("A tokenizer is required (the GPT-NeoX-20B tokenizer directory, --tokenizer).")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"Cannot load a tokenizer from {tokenizer}: {type(e).__name__}: {e}") from e
    return tokenizer


def convert_omnimamba_checkpoint(
    checkpoint: str | os.PathLike | OriginalWeights,
    output_dir: str | os.PathLike,
    *,
    tokenizer,
    dino: str | os.PathLike | None = None,
    siglip: str | os.PathLike | None = None,
    vq: str | os.PathLike | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    t2i_caption_length: int | None = None,
    image_size: int | None = None,
    dino_num_attention_heads: int | None = None,
    siglip_num_attention_heads: int | None = None,
    mamba_n_groups: int = 1,
    config_overrides: Mapping | None = None,
    verify: bool = False,
    verify_device: str = "cpu",
    verify_dtype: str = "float64",
    verify_rtol: float | None = None,
    overwrite: bool = False,
    base_model: str | None = ORIGINAL_REPO,
    hash_inputs: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> dict:
    """Convert the original artefacts into `output_dir` (see the module docstring); returns the conversion report.

    The directory is assembled in a temporary sibling and moved into place only when complete (and verified, with
    `verify=True`); on any error nothing is left behind. `dtype` ("float32" default, "bfloat16", "float16") is applied
    only at the end, to every floating-point tensor."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if verify_dtype not in _VERIFY_DTYPES:
        raise ValueError(f"verify_dtype must be one of {sorted(_VERIFY_DTYPES)}, got {verify_dtype!r}.")
    target = Path(output_dir).absolute()
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass --overwrite to replace it.")
    if push_to_hub:
        _check_can_push(push_to_hub)
    sources = {"checkpoint": checkpoint, "dino": dino, "siglip": siglip, "vq": vq}
    for name, source in {**sources, "tokenizer": tokenizer}.items():
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            path = Path(source).absolute()
            if path == target or target in path.parents:
                raise ValueError(f"--{name} {path} lies inside the output directory {target}: choose another output.")
    base_tok = _load_base_tokenizer(tokenizer)

    if isinstance(checkpoint, OriginalWeights):
        original, inputs = checkpoint, {}
    else:
        original = load_original_weights(checkpoint, dino=dino, siglip=siglip, vq=vq)
        inputs = {name: str(p) for name, p in sources.items() if p}

    non_finite = [k for k, v in original.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(
            f"{len(non_finite)} source tensors hold NaN or infinite values, e.g. {non_finite[:5]}: the checkpoint is "
            "damaged (or was saved after a diverged step); convert an earlier one."
        )
    token_ids = token_ids_from_tokenizer(base_tok)
    config = infer_config_from_state_dict(
        original,
        token_ids=token_ids,
        t2i_caption_length=t2i_caption_length,
        image_size=image_size,
        dino_num_attention_heads=dino_num_attention_heads,
        siglip_num_attention_heads=siglip_num_attention_heads,
        mamba_n_groups=mamba_n_groups,
        overrides=config_overrides,
    )
    geometry, released = _geometry(config), _geometry(OmniMambaConfig())
    if geometry != released:
        # depth is read from the layer indices present, so a checkpoint cut after some layer reads as a smaller model
        logger.warning(
            f"The checkpoint has {geometry['mamba_layers']} Mamba layers, {geometry['dinov2_blocks']} DINOv2 and "
            f"{geometry['siglip_blocks']} SigLIP blocks; the released OmniMamba-1.3B has "
            f"{' / '.join(str(n) for n in released.values())}. Fine for another model size; if this is meant to be "
            "the released checkpoint, it is truncated."
        )
    converted = cast_state_dict(convert_state_dict(original, config, progress=progress), _DTYPES[dtype])
    config.dtype = _DTYPES[dtype]
    model = build_model(config, converted)
    model.generation_config = make_generation_config(config)

    from ..processing.processing_omnimamba import OmniMambaProcessor

    processor = OmniMambaProcessor.from_config(config, base_tok)

    src_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in original.state_dict.values()})
    report = {
        "converter": f"omnimamba_hf {_package_version()} (conversion/convert_omnimamba_weights_to_hf.py)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "inputs": {
            name: {"path": Path(p).name, **({"sha256": sha256_file(resolve_weights_path(p), progress)} if hash_inputs else {})}
            for name, p in inputs.items()
        },
        "source_dtypes": src_dtypes,
        "dtype": dtype,
        "geometry": geometry,
        "source_tensors": len(original.state_dict),
        "converted_tensors": len(converted),
        "parameters": sum(p.numel() for p in model.parameters()),
        "ignored_input_entries": {Path(k).name: len(v) for k, v in original.ignored.items()},
    }

    with atomic_output_dir(target, overwrite=overwrite) as tmp, _transformers_progress_bars(progress):
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        if verify:
            del model  # its tensors are `converted`'s; the verification reloads from disk
            report["verification"] = verify_conversion(
                tmp, original, converted=converted, dtype=_VERIFY_DTYPES[verify_dtype], device=verify_device,
                rtol=verify_rtol, progress=progress,
            )  # fmt: skip
        (tmp / CONVERSION_REPORT).write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(config, report, base_model))
    logger.info("wrote %s", target)

    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(push_to_hub, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=push_to_hub,
                folder_path=str(target),
                repo_type="model",
                commit_message=f"OmniMamba converted by omnimamba_hf {_package_version()}",
            )
        except Exception as err:  # the conversion itself is done and kept: say how to retry the upload alone
            raise RuntimeError(
                f"The conversion is complete in {target}, but uploading it to {push_to_hub} failed ({err}). Retry "
                f"the upload alone with: hf upload {push_to_hub} {target} ."
            ) from err
        report["pushed_to"] = push_to_hub
    return report


def _check_can_push(repo_id: str) -> None:
    """Before any work: --push-to-hub needs the network and credentials (found out only after a long conversion
    otherwise)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"--push-to-hub {repo_id} needs the network, but HF_HUB_OFFLINE is set: unset it, or convert "
                         "without --push-to-hub and upload later (hf upload).")  # fmt: skip
    if huggingface_hub.get_token() is None:
        raise ValueError(f"--push-to-hub {repo_id} needs a Hugging Face token: log in with `hf auth login` or set HF_TOKEN.")


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _package_version() -> str:
    try:
        from omnimamba_hf import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ---- command line ---------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnimamba-hf convert",
        description="Convert the original OmniMamba release (OmniMamba-1.3b.pth + timm DINOv2/SigLIP + LlamaGen VQ + "
        "GPT-NeoX-20B tokenizer) into a Hugging Face checkpoint directory.",
    )
    io = p.add_argument_group("inputs / output")
    io.add_argument("--checkpoint", required=True, help="OmniMamba checkpoint (.pth/.bin/.safetensors/dir).")
    io.add_argument("--dino", help="timm vit_large_patch14_reg4_dinov2.lvd142m weights (file or dir), if not in the checkpoint.")
    io.add_argument("--siglip", help="timm vit_so400m_patch14_siglip_384 weights (file/dir; open_clip visual.trunk.* accepted).")
    io.add_argument("--vq", help="LlamaGen vq_ds16_t2i.pt (dict with key 'model'), if not in the checkpoint.")
    io.add_argument("--tokenizer", required=True, help="GPT-NeoX-20B tokenizer directory (or hub id if cached).")
    io.add_argument("--output", required=True, help="Output directory (created atomically).")
    io.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    fmt = p.add_argument_group("format")
    fmt.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                     help="Weights dtype (default float32: the original runs in float32 with fp16-valued LM weights; "
                     "float32 keeps every value exactly). Cast only at the end.")  # fmt: skip
    fmt.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB).")
    fmt.add_argument("--base-model", default=ORIGINAL_REPO, help="base_model for the model card ('' for none).")
    fmt.add_argument("--no-hash", action="store_true", help="Do not record SHA-256 of the inputs in the report.")
    arch = p.add_argument_group("sizes that tensor shapes do not determine (defaults: the released model)")
    arch.add_argument("--t2i-caption-length", type=int, help="Caption slots of the T2I prompt (default 68).")
    arch.add_argument("--image-size", type=int, help="Vision input size (default 384 for 27x27x14px towers, else grid*patch).")
    arch.add_argument("--dino-heads", type=int, help="DINOv2 attention heads (default width/64).")
    arch.add_argument("--siglip-heads", type=int, help="SigLIP attention heads (default 16 for width 1152, else width/64).")
    arch.add_argument("--mamba-n-groups", type=int, default=1, help="Mamba-2 B/C groups (default 1).")
    arch.add_argument("--config-overrides", help="JSON (string or file) merged into the inferred OmniMambaConfig kwargs.")
    chk = p.add_argument_group("verification / publishing")
    chk.add_argument("--verify", action="store_true",
                     help="Reload the output and compare MMU/T2I logits and VQ decodes with an independent "
                     "implementation of the original formulae; the output is kept only if it passes.")  # fmt: skip
    chk.add_argument("--verify-device", default="cpu", help="Device for --verify (e.g. cuda).")
    chk.add_argument("--verify-dtype", default="float64", choices=sorted(_VERIFY_DTYPES),
                     help="Compute dtype of both sides of --verify (float64: ~8 bytes/parameter, isolates conversion "
                     "errors from float32 rounding).")  # fmt: skip
    chk.add_argument("--verify-rtol", type=float,
                     help="Tolerance relative to max(1, max|ref|) (default 1e-6 in float64, 1e-3 in float32).")  # fmt: skip
    chk.add_argument("--push-to-hub", metavar="REPO", help="Upload the finished directory to this Hub repo.")
    chk.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p


def _read_overrides(value: str | None) -> dict | None:
    if not value:
        return None
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config-overrides is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError("--config-overrides must be a JSON object.")
    return data


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`python -m omnimamba_hf.conversion.convert_omnimamba_weights_to_hf --help`)."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    with sigterm_as_keyboard_interrupt():
        report = convert_omnimamba_checkpoint(
            args.checkpoint,
            args.output,
            tokenizer=args.tokenizer,
            dino=args.dino,
            siglip=args.siglip,
            vq=args.vq,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            t2i_caption_length=args.t2i_caption_length,
            image_size=args.image_size,
            dino_num_attention_heads=args.dino_heads,
            siglip_num_attention_heads=args.siglip_heads,
            mamba_n_groups=args.mamba_n_groups,
            config_overrides=_read_overrides(args.config_overrides),
            verify=args.verify,
            verify_device=args.verify_device,
            verify_dtype=args.verify_dtype,
            verify_rtol=args.verify_rtol,
            overwrite=args.overwrite,
            base_model=args.base_model or None,
            hash_inputs=not args.no_hash,
            push_to_hub=args.push_to_hub,
            private=args.private,
            progress=not args.quiet,
        )
    print(
        f"Converted {report['source_tensors']} source tensors into {report['converted_tensors']} "
        f"({report['parameters']:,} parameters, {report['dtype']}) at {Path(args.output).absolute()}"
        + (f"; pushed to {report['pushed_to']}" if report.get("pushed_to") else "")
    )
    return 0


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt():
    """Inside: SIGTERM raises KeyboardInterrupt, like Ctrl-C, so the atomic writers remove their temporary output.
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    import threading

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = [
    "ORIGINAL_TO_HF",
    "HF_TO_ORIGINAL",
    "DELEGATES",
    "Tied",
    "Delegate",
    "OriginalWeights",
    "map_original_key",
    "hf_key_to_original",
    "load_checkpoint_object",
    "load_original_weights",
    "gather_original_weights",
    "token_ids_from_tokenizer",
    "infer_config_from_state_dict",
    "target_key_shapes",
    "convert_state_dict",
    "cast_state_dict",
    "build_model",
    "make_generation_config",
    "atomic_output_dir",
    "verify_conversion",
    "convert_omnimamba_checkpoint",
    "main",
]


if __name__ == "__main__":
    raise SystemExit(main())
