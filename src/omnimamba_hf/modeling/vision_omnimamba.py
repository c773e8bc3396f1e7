"""OmniMamba's MMU vision encoder: DINOv2-L/14-reg4 ‖ SigLIP-SO400M/14 at 384 px (ORIGINAL-SPEC §2.1).

Both towers are the in-tree transformers modules (`Dinov2WithRegistersModel`, `SiglipVisionModel`), so the attention
implementation (eager / SDPA / flash) is chosen the usual way through their configs. The forward reproduces
timm's `get_intermediate_layers(n={depth - 2})` of the original: the output of one intermediate block (block 22 of 24
for DINOv2, 25 of 27 for SigLIP), taken before any final norm, with DINOv2's class + register tokens dropped; the two
patch grids are concatenated along channels, DINOv2 first. Blocks after the taken one are not run (spec §8 #12).

Weights: `conversion/vision_towers.py` maps the original timm state dicts onto this module (spec Appendix A).

This file is exported next to the weights for `trust_remote_code=True`: it only imports torch, transformers and its
siblings with a single dot.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2WithRegistersModel, SiglipVisionModel

from .configuration_omnimamba import OmniMambaVisionConfig


class OmniMambaVisionModel(nn.Module):
    r"""
    The fused DINOv2 + SigLIP patch featurizer of OmniMamba's understanding path.

    `forward(pixel_values)` takes `(batch, 2, 3, S, S)` pixels (index 0 of dim 1 normalised for DINOv2 with the
    ImageNet mean/std, index 1 normalised for SigLIP with 0.5/0.5, as `OmniMambaImageProcessor` returns them) and
    returns `(batch, num_patches, dino_hidden + siglip_hidden)` features, `(batch, 729, 2176)` for the released model.

    SigLIP keeps its (unused) attention-pool `head` so that the parameter count and weights match the original tower.

    Example:

    ```python
    >>> import torch
    >>> from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaVisionConfig
    >>> from omnimamba_hf.modeling.vision_omnimamba import OmniMambaVisionModel
    >>> config = OmniMambaVisionConfig(
    ...     dino_config={"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28},
    ...     siglip_config={"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3,
    ...                    "num_attention_heads": 2, "image_size": 28},
    ... )
    >>> OmniMambaVisionModel(config)(torch.randn(1, 2, 3, 28, 28)).shape
    torch.Size([1, 4, 40])
    ```
    """

    def __init__(self, config: OmniMambaVisionConfig):
        super().__init__()
        self.config = config
        self.dino = Dinov2WithRegistersModel(config.dino_config)
        self.siglip = SiglipVisionModel(config.siglip_config)
        # Block index whose output is taken (config.validate_architecture bounds the feature layers to [-depth, depth)).
        self.dino_block_index = config.dino_feature_layer % config.dino_config.num_hidden_layers
        self.siglip_block_index = config.siglip_feature_layer % config.siglip_config.num_hidden_layers
        # DINOv2 sequence = [class, registers..., patches] (same order as timm); the prefix is dropped (spec §2.1).
        self.dino_num_prefix_tokens = 1 + config.dino_config.num_register_tokens

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        channels, size = self.config.siglip_config.num_channels, self.config.image_size
        expected = f"(batch, 2, {channels}, {size}, {size})"
        hint = (
            f"Expected pixel_values of shape {expected}: the same image normalised for DINOv2 (index 0) and for "
            "SigLIP (index 1) along dim 1, as `OmniMambaImageProcessor` produces them"
        )
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"{hint}; got a {type(pixel_values).__name__}.")
        shape = tuple(pixel_values.shape)
        if pixel_values.ndim != 5 or shape[1] != 2 or shape[2] != channels or shape[3:] != (size, size):
            raise ValueError(f"{hint}; got shape {shape}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"{hint}, as normalised floats; got dtype {pixel_values.dtype}.")

    @staticmethod
    def _run_blocks(hidden_states: torch.Tensor, layers: nn.ModuleList, last: int) -> torch.Tensor:
        # Full (bidirectional) attention over a fixed-size grid: no mask. Blocks after `last` are skipped (§8 #12).
        for layer in layers[: last + 1]:
            hidden_states = layer(hidden_states, None)
        return hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_pixel_values(pixel_values)
        # DINOv2: patch conv, + position table (patch rows; the class row is zero, see conversion), then class and
        # register tokens. With the config's square grid, `interpolate_pos_encoding` returns the table itself (no
        # run-time resampling); the 37→27 resample of the original happens once, at conversion.
        dino = self.dino.embeddings(pixel_values[:, 0])
        dino = self._run_blocks(dino, self.dino.encoder.layer, self.dino_block_index)
        dino = dino[:, self.dino_num_prefix_tokens :]
        # SigLIP: patch conv + native 27×27 position table, no prefix tokens, no interpolation.
        siglip = self.siglip.embeddings(pixel_values[:, 1])
        siglip = self._run_blocks(siglip, self.siglip.encoder.layers, self.siglip_block_index)
        # No final layernorm on either tower; DINOv2 channels first (§2.1).
        return torch.cat([dino, siglip.to(dino.dtype)], dim=-1)


__all__ = ["OmniMambaVisionModel"]
