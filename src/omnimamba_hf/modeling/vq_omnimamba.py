"""LlamaGen VQ-16 image tokenizer (ORIGINAL-SPEC §6) on top of transformers' `JanusVQVAE`.

Janus' VQ-VAE has LlamaGen's architecture and keys (after the renaming of `conversion/vq_llamagen.py`, §6.4.3), and its
decode is bit-identical to LlamaGen's `decode_code` (§6.4). Its *encode* is not: Janus quantises the raw latent against
the raw codebook, LlamaGen L2-normalises both (§6.2, §6.4.1). `OmniMambaVQVAE` swaps in a quantiser that follows
LlamaGen, so `encode_to_codes` reproduces LlamaGen's token ids (used to tokenise training images, §7.5).

This file is exported next to the weights for `trust_remote_code=True` loading: it only imports torch, transformers
and its siblings with a single dot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.janus.modeling_janus import (
    JanusPreTrainedModel,
    JanusVQVAE,
    JanusVQVAEDecoder,
    JanusVQVAEEncoder,
    JanusVQVAEOutput,
    JanusVQVAEVectorQuantizer,
)

from .configuration_omnimamba import OmniMambaVQVAEConfig

_GROUPS = 32  # GroupNorm(32, eps 1e-6) everywhere, hard-coded in LlamaGen and Janus alike (§6.1)


class OmniMambaVQVAEVectorQuantizer(JanusVQVAEVectorQuantizer):
    """LlamaGen's `VectorQuantizer` with `codebook_l2_norm=True` (§6.2). Same parameters as Janus' (the codebook
    `embedding`); LlamaGen's `codebook_used` buffer is training bookkeeping and is not kept."""

    def forward(self, hidden_state: torch.Tensor):
        # (B, C, h, w) -> (B, h, w, C); normalise latent and codebook (F.normalize, eps 1e-12)
        z = F.normalize(hidden_state.permute(0, 2, 3, 1).contiguous(), p=2, dim=-1)
        z_flat = z.view(-1, self.embedding_dim)
        codebook = F.normalize(self.embedding.weight, p=2, dim=-1)
        # ||z||^2 + ||e||^2 - 2 z.e, argmin = first minimum; ids flat in (b, h, w) raster order (§6.2)
        distances = (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, codebook.t())
        )
        indices = torch.argmin(distances, dim=1)
        z_q = codebook[indices].view(z.shape)
        # LlamaGen's training losses on the normalised latent (codebook + beta * commitment; entropy ratio 0, §6.4.5)
        loss = torch.mean((z_q - z.detach()) ** 2) + self.beta * torch.mean((z_q.detach() - z) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through; value = normalised code
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices

    def get_codebook_entry(self, image_tokens: torch.LongTensor) -> torch.Tensor:
        # LlamaGen order: normalise the whole codebook, then gather (§6.2 decode); -> (B, C, grid, grid)
        codebook = F.normalize(self.embedding.weight, p=2, dim=-1)
        z_q = codebook[image_tokens].view(image_tokens.shape[0], *self.quant_state_dims, self.embedding_dim)
        return z_q.permute(0, 3, 1, 2).contiguous()


class OmniMambaVQVAE(JanusVQVAE):
    r"""
    The LlamaGen VQ-16 tokenizer of OmniMamba (16384 codes × 8 dims, 256×256 images ↔ 16×16 token grids): Janus'
    encoder/decoder with LlamaGen's L2-normalised quantiser. 71,883,403 parameters at the default config, exactly
    LlamaGen's `VQ_16()` (no Janus-only parts; no buffers).

    Example:

    ```python
    >>> import torch
    >>> from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaVQVAEConfig
    >>> from omnimamba_hf.modeling.vq_omnimamba import OmniMambaVQVAE
    >>> vq = OmniMambaVQVAE(OmniMambaVQVAEConfig())
    >>> codes = vq.encode_to_codes(torch.rand(1, 3, 256, 256) * 2 - 1)   # (1, 256) ids in [0, 16384)
    >>> vq.decode_codes(codes).shape
    torch.Size([1, 3, 256, 256])
    ```
    """

    config_class = OmniMambaVQVAEConfig
    config: OmniMambaVQVAEConfig
    _no_split_modules = ["JanusVQVAEAttnBlock", "JanusVQVAEResnetBlock", "OmniMambaVQVAEVectorQuantizer"]

    def __init__(self, config: OmniMambaVQVAEConfig):
        _check_config(config)
        # Build the tree once with our quantiser instead of calling JanusVQVAE.__init__ and swapping it afterwards.
        JanusPreTrainedModel.__init__(self, config)
        self.encoder = JanusVQVAEEncoder(config)
        self.quantize = OmniMambaVQVAEVectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = JanusVQVAEDecoder(config)
        self.gradient_checkpointing = False
        self.post_init()
        self.eval()  # frozen tokenizer (§6.3); Janus calls eval() before building its decoder, we do it for all

    def _init_weights(self, module):
        if isinstance(module, nn.Embedding) and module is self.quantize.embedding:
            # LlamaGen's codebook init: uniform(-1/n, 1/n), then L2-normalised rows (§6.2); skipped for loaded weights.
            # (Dispatched on the Embedding itself: for custom code, transformers skips modules without own params.)
            n = module.num_embeddings
            init.uniform_(module.weight, -1.0 / n, 1.0 / n)
            init.copy_(module.weight, F.normalize(module.weight, p=2, dim=-1))
        else:
            super()._init_weights(module)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> JanusVQVAEOutput:
        """LlamaGen's `VQModel.forward` (see `reconstruct`): the reconstruction and the quantiser's codebook +
        β·commitment loss (§6.2). (`JanusVQVAE.forward` decodes from the argmin ids: same values, but no gradient
        reaches the encoder or `quant_conv`.)"""
        _check_pixels(pixel_values, self.config)
        reconstruction, embedding_loss, _, _ = self.reconstruct(pixel_values)
        return JanusVQVAEOutput(reconstruction, embedding_loss)

    def reconstruct(self, pixel_values: torch.Tensor):
        """encoder → quant_conv → quantiser → post_quant_conv → decoder, decoding the quantiser's straight-through
        output, so a reconstruction loss trains the encoder too. Returns `(reconstruction, embedding_loss, codes,
        latent)`; `latent` is the un-normalised pre-quantiser vector (what dead-code restarts sample from)."""
        latent = self.quant_conv(self.encoder(pixel_values))
        quantized, embedding_loss, codes = self.quantize(latent)
        return self.decoder(self.post_quant_conv(quantized)), embedding_loss, codes, latent

    @property
    def grid_size(self) -> int:
        """Side of the token grid (16 for 256-px images)."""
        return self.config.num_patches

    @torch.no_grad()
    def encode_to_codes(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Token ids of images, as LlamaGen's `VQModel.encode` (§6.2, §7.5).

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, image_size, image_size)`): RGB in [-1, 1].

        Returns:
            `torch.LongTensor` of shape `(batch, grid_size**2)`: ids in [0, num_embeddings), raster order.
        """
        _check_pixels(pixel_values, self.config)
        pixel_values = pixel_values.to(dtype=self.quant_conv.weight.dtype, device=self.quant_conv.weight.device)
        return self.encode(pixel_values).image_tokens.view(pixel_values.shape[0], -1)

    def decode_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Images from token ids, as LlamaGen's `decode_code(codes, shape=[B, C, grid, grid])` (§6.2).

        Args:
            codes (`torch.LongTensor` of shape `(batch, grid_size**2)`): ids in [0, num_embeddings), raster order.

        Returns:
            `torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`: nominally in [-1, 1], **not** clamped.
        """
        n_tokens, n_codes = self.grid_size**2, self.config.num_embeddings
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError("codes must be an integer tensor of shape (batch, grid_size**2).")
        if codes.ndim != 2 or codes.shape[1] != n_tokens:
            raise ValueError(f"codes must have shape (batch, {n_tokens}); got {tuple(codes.shape)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_codes):
            raise ValueError(
                f"codes must lie in [0, {n_codes}); got values in [{int(codes.min())}, {int(codes.max())}]."
            )
        return self.decode(codes.to(device=self.quant_conv.weight.device, dtype=torch.long))


def _check_pixels(pixel_values, config: OmniMambaVQVAEConfig) -> None:
    if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point() or pixel_values.ndim != 4:
        raise ValueError("pixel_values must be a floating-point tensor of shape (batch, channels, height, width).")
    expected = (config.in_channels, config.image_size, config.image_size)
    if tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
            f"(config.image_size={config.image_size}); got {tuple(pixel_values.shape)}."
        )


def _check_config(config: OmniMambaVQVAEConfig) -> None:
    """The VQ geometry must be consistent: one 2× downsample per level after the first, GroupNorm(32) channels."""
    factor = 2 ** (len(config.channel_multiplier) - 1)
    if config.image_size != config.num_patches * factor:
        raise ValueError(
            f"vq_config: image_size={config.image_size} must equal num_patches={config.num_patches} × {factor} "
            f"(2 ** (len(channel_multiplier) - 1))."
        )
    widths = {config.base_channels * m for m in config.channel_multiplier}
    if any(w % _GROUPS for w in widths):
        raise ValueError(
            f"vq_config: every base_channels × channel_multiplier width must be divisible by {_GROUPS} (GroupNorm "
            f"groups); got widths {sorted(widths)}."
        )
    if config.double_latent:
        raise ValueError("vq_config: double_latent=True has no LlamaGen counterpart.")


__all__ = ["OmniMambaVQVAE", "OmniMambaVQVAEVectorQuantizer"]
