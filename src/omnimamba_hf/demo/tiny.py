"""The demo's tiny OmniMamba: configuration, tokenizer and processor.

The architecture is the released one at toy width (every module and code path of `OmniMambaForConditionalGeneration`
is there: DINOv2-reg ‖ SigLIP towers, fused-GELU projector, Mamba-2 blocks with the two task adapters, caption MLP,
image-code embedding MLP, both position tables, tied heads, a LlamaGen-architecture VQ):

| part | released | demo |
|---|---|---|
| vision towers | 384 px, patch 14 → 729 patches; DINOv2-L (24 × 1024) ‖ SigLIP-SO400M (27 × 1152) | 32 px, patch 8 → 16 patches; 3 × 32 ‖ 3 × 32 |
| Mamba-2 backbone | 48 × d_model 2048, d_state 128, 64 heads of 64 | 4 × d_model 96, d_state 16, 12 heads of 16 |
| VQ | 256 px ↔ 16 × 16 codes of 16384 (8-dim, L2-normalised) | 8 px ↔ 4 × 4 codes of 64 (8-dim, L2-normalised) |
| T2I prompt | 68 caption slots (72 ids) | 8 caption slots (12 ids) |
| text vocabulary | GPT-NeoX-20B (50277) + 11 → 50288 | byte-level BPE trained on the demo's texts (382) + 11 → 400 |

The GPT-NeoX-20B tokenizer cannot be downloaded here, so `demo_base_tokenizer` trains a byte-level BPE with the same
special tokens (`<|endoftext|>` = 0, `<|padding|>` = 1, no BOS/EOS) on the demo's texts, and
`build_omnimamba_tokenizer` extends it exactly as it extends GPT-NeoX; the special ids follow from its size through
`token_ids_for_base_vocab`, as the released ids follow from 50277.
"""

from __future__ import annotations

import functools

from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaConfig
from omnimamba_hf.processing.tokenization_omnimamba import token_ids_for_base_vocab

from .data import demo_texts

TOKENIZER_VOCAB_SIZE = 512  # an upper bound: BPE stops when the demo texts have no pair left to merge (382 ids)

# Sizes of the demo model (see the module docstring).
VISION_IMAGE_SIZE = 32
VISION_PATCH_SIZE = 8
VQ_IMAGE_SIZE = 8
VQ_GRID = 4
VQ_CODES = 64
CAPTION_SLOTS = 8
MMU_TEXT_LENGTH = 20  # text part of an MMU training sequence (the original's 449)


def train_neox_style_tokenizer_json(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE like GPT-NeoX-20B's (`<|endoftext|>` = 0, `<|padding|>` = 1, nothing added around texts),
    trained on `texts`: the stand-in for the GPT-NeoX tokenizer where it cannot be downloaded (demo and tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _base_tokenizer_json(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> str:
    return train_neox_style_tokenizer_json(demo_texts() * 4, vocab_size)


def demo_base_tokenizer():
    """A GPT-NeoX-style byte-level BPE (`<|endoftext|>` = 0 = bos = eos = unk, `<|padding|>` = 1, nothing added
    around texts) trained on the demo's texts: the stand-in for `EleutherAI/gpt-neox-20b`. Deterministic."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def demo_tokenizer():
    """The base tokenizer extended with `[PAD]`, the nine task tokens and `<image>` (`build_omnimamba_tokenizer`)."""
    from omnimamba_hf.processing import build_omnimamba_tokenizer

    return build_omnimamba_tokenizer(demo_base_tokenizer())


def demo_config(base_vocab_size: int | None = None, **overrides) -> OmniMambaConfig:
    """The tiny OmniMamba configuration of the demo; token ids derived from the base tokenizer's size."""
    if base_vocab_size is None:
        base_vocab_size = len(demo_base_tokenizer())
    ids = token_ids_for_base_vocab(base_vocab_size)
    text_vocab = ids.pop("text_vocab_size")
    for unused in ("soc_token_id", "eoc_token_id", "lvg_token_id"):
        ids.pop(unused)
    n_patches = (VISION_IMAGE_SIZE // VISION_PATCH_SIZE) ** 2
    levels = (VQ_IMAGE_SIZE // VQ_GRID).bit_length()  # one 2× downsample per level after the first
    kwargs = dict(
        text_config={
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_heads": 12,
            "head_dim": 16,
            "state_size": 16,
            "chunk_size": 32,
            "vocab_size": text_vocab,
            "pad_token_id": ids["pad_token_id"],
        },
        vision_config={
            "dino_config": {
                "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                "image_size": VISION_IMAGE_SIZE, "patch_size": VISION_PATCH_SIZE,
            },
            "siglip_config": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                "image_size": VISION_IMAGE_SIZE, "patch_size": VISION_PATCH_SIZE,
            },
        },  # fmt: skip
        vq_config={
            "embed_dim": 8,
            "num_embeddings": VQ_CODES,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1] * levels,
            "num_res_blocks": 1,
            "num_patches": VQ_GRID,
            "image_size": VQ_IMAGE_SIZE,
        },
        projector_intermediate_size=128,
        image_embedding_intermediate_size=128,
        num_image_tokens=n_patches,
        mmu_max_position_embeddings=4 + n_patches + MMU_TEXT_LENGTH + 16,
        t2i_caption_length=CAPTION_SLOTS,
        t2i_max_position_embeddings=CAPTION_SLOTS + 5 + VQ_GRID**2,
        task_lora_dropout=0.0,
        **ids,
    )
    kwargs.update(overrides)
    return OmniMambaConfig(**kwargs)


def demo_processor(config: OmniMambaConfig, tokenizer=None):
    """`OmniMambaProcessor.from_config` with the demo tokenizer; images are resized to the towers' 32 px."""
    from omnimamba_hf.processing import OmniMambaProcessor

    return OmniMambaProcessor.from_config(config, tokenizer if tokenizer is not None else demo_base_tokenizer())


__all__ = [
    "CAPTION_SLOTS",
    "MMU_TEXT_LENGTH",
    "VISION_IMAGE_SIZE",
    "VQ_IMAGE_SIZE",
    "demo_base_tokenizer",
    "demo_config",
    "demo_processor",
    "demo_tokenizer",
]
