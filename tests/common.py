"""Shared builders for the offline test-suite: a GPT-NeoX-style byte-level BPE tokenizer trained on the spot, and
tiny OmniMamba configurations whose special-token ids follow from that tokenizer exactly as the released model's
follow from GPT-NeoX-20B (ORIGINAL-SPEC §1.4)."""

from __future__ import annotations

import functools

from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaConfig
from omnimamba_hf.processing.tokenization_omnimamba import token_ids_for_base_vocab

CORPUS = [
    "USER: What digit is this? ASSISTANT: seven",
    "USER: Please describe it in detail. ASSISTANT: a handwritten digit on a dark background.",
    "In: What is shown?\nOut: a cat sitting next to a dog",
    "a handwritten zero one two three four five six seven eight nine",
    "A photo of a red bicycle leaning against a wall.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


@functools.lru_cache(maxsize=None)
def base_tokenizer_json(vocab_size: int = 300) -> str:
    """A byte-level BPE like GPT-NeoX-20B's: `<|endoftext|>` = 0, `<|padding|>` = 1, no BOS/EOS added."""
    from omnimamba_hf.demo.tiny import train_neox_style_tokenizer_json

    return train_neox_style_tokenizer_json(CORPUS * 4, vocab_size)


def make_base_tokenizer(vocab_size: int = 300):
    """A `PreTrainedTokenizerFast` standing in for `EleutherAI/gpt-neox-20b` (same special tokens, same behaviour)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base_tokenizer_json(vocab_size)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_config(base_vocab_size: int | None = None, **overrides) -> OmniMambaConfig:
    """2 Mamba-2 layers of width 32, 2-block vision towers on 28-px images (2×2 = 4 patches), a 2-level VQ with a
    4×4 grid over 64-codes, short position tables. Token ids are derived from the tiny tokenizer's size."""
    if base_vocab_size is None:
        base_vocab_size = len(make_base_tokenizer())
    ids = token_ids_for_base_vocab(base_vocab_size)
    text_vocab = ids.pop("text_vocab_size")
    for unused in ("soc_token_id", "eoc_token_id", "lvg_token_id"):
        ids.pop(unused)
    kwargs = dict(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_heads": 4,
            "head_dim": 16,
            "state_size": 8,
            "chunk_size": 8,
            "vocab_size": text_vocab,
            "pad_token_id": ids["pad_token_id"],
        },
        vision_config={
            "dino_config": {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
            "siglip_config": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        },
        vq_config={
            "embed_dim": 4,
            "num_embeddings": 64,
            "latent_channels": 16,
            "base_channels": 32,
            "channel_multiplier": [1, 2],
            "num_res_blocks": 1,
            "num_patches": 4,
            "image_size": 8,
        },
        projector_intermediate_size=48,
        image_embedding_intermediate_size=48,
        num_image_tokens=4,
        mmu_max_position_embeddings=64,
        t2i_caption_length=6,
        t2i_max_position_embeddings=6 + 4 + 16 + 1,
        **ids,
    )
    kwargs.update(overrides)
    return OmniMambaConfig(**kwargs)


def randomize_routing_(model, seed: int = 0, scale: float = 0.2):
    """Task adapters start as no-ops and position tables near zero: make them random so that task routing and
    position bugs change the outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "task_adapters" in name or "position_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def mmu_prompt_ids(config, prompt=(5, 6, 7, 8)) -> list[int]:
    """The original MMU layout (spec §4.2) with `num_image_tokens` placeholders and the given prompt ids."""
    c = config
    image = [c.image_token_id] * c.num_image_tokens
    return [c.mmu_token_id, c.soi_token_id, *image, c.eoi_token_id, c.sot_token_id, *prompt]


def t2i_prompt_ids(config, caption=(8, 9, 10), codes=()) -> list[int]:
    """The original T2I layout (spec §4.5): caption left-padded with [PAD], then optional image codes as ids."""
    c = config
    slots = [c.pad_token_id] * (c.t2i_caption_length - len(caption)) + list(caption)
    return [c.t2i_token_id, c.sot_token_id, *slots, c.eot_token_id, c.soi_token_id] + [c.text_vocab_size + k for k in codes]


def run_in_triton_interpreter(script: str, timeout: int = 900):
    """Run `script`'s main() in a subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton
    is imported) and return the JSON object its last output line prints."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
