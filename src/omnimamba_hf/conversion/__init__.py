"""Conversion of the original OmniMamba release into the Hugging Face layout.

* `convert_omnimamba_weights_to_hf`: the whole pipeline and its command line (`main(argv)`), the ordered key map
  `ORIGINAL_TO_HF`, config inference from tensor shapes, the atomic writer and `--verify`;
* `vision_towers`: timm DINOv2 / SigLIP tower state dicts → `OmniMambaVisionModel` (and back);
* `vq_llamagen`: LlamaGen VQ-16 → `OmniMambaVQVAE` (and back);
* `export_to_original`: the inverse of the whole conversion, a model → the original release layout (`.pth`);
* `reference`: an independent implementation of the original formulae on original-layout weights (the oracle).

Names are imported lazily, so `python -m omnimamba_hf.conversion.convert_omnimamba_weights_to_hf` runs the module once.
"""

import importlib

_EXPORTS = {
    "convert_omnimamba_weights_to_hf": (
        "ORIGINAL_TO_HF",
        "OriginalWeights",
        "convert_omnimamba_checkpoint",
        "convert_state_dict",
        "gather_original_weights",
        "infer_config_from_state_dict",
        "load_original_weights",
        "main",
        "verify_conversion",
    ),
    "vision_towers": (
        "convert_dino_state_dict_to_timm",
        "convert_siglip_state_dict_to_timm",
        "convert_timm_dino_state_dict",
        "convert_timm_siglip_state_dict",
        "resample_dino_pos_embed",
    ),
    "vq_llamagen": (
        "convert_llamagen_vq_state_dict",
        "convert_vq_state_dict_to_llamagen",
        "unwrap_llamagen_checkpoint",
    ),
    "export_to_original": ("export_original_state_dict", "save_original_checkpoint"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
