#!/usr/bin/env python
"""Run the ORIGINAL OmniMamba next to omnimamba_hf and record golden references (issue #9).

    python tests/parity/run_original_parity.py --original PATH --out DIR --size tiny|full [--dtypes fp32,bf16]

PATH is a checkout (or `git archive`) of hustvl/OmniMamba at b372978. It is imported from there at run time and never
copied into this repository. The run needs the original's GPU stack: CUDA, mamba-ssm + causal-conv1d, timm,
torchvision (see docs/PARITY.md for the environment used); `--cpu-stubs` swaps in tiny CPU stand-ins for those three
packages to dry-run the plumbing only (its numbers are not golden).

What it does, for one size (`tiny`: every module of the original at toy widths; `full`: the released 1.3B widths):

1. builds the original `OmniMamba(args, stage="inference")` from `config/config_stage2.yaml`, offline, patching at
   run time only what the original needs to run without downloads on the current stack (`install_offline_patches`;
   each patch is listed in the report);
2. gives it fixed-seed random weights (`randomize_`, every tensor by a rule keyed on its name, rounded to
   fp16-representable values as in the released fp16 checkpoint); `tiny` saves that state dict in the original layout
   (`weights_original.safetensors`) and converts the file, `full` converts the same state dict in memory, both with
   the project's converter (`parity.golden.convert_original`);
3. runs both on fixed inputs: MMU logits (with image, text-only), the MMU and T2I training losses, greedy MMU
   continuations (with image, text-only), T2I logits, greedy full-length T2I sequences (+ decoded images), VQ decodes
   and encodes, vision features, processor ids and image preprocessing; in float32 (TF32 off everywhere, Triton dots
   in IEEE fp32, mamba-ssm's one-config "deterministic" Triton kernels) and in bfloat16;
4. writes `report.json` (every comparison) and, for `tiny`, the golden fixture files of `tests/fixtures/parity_tiny/`.

Results and the exact command used: docs/PARITY.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
for p in (REPO / "src", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# ---- the two sizes ----------------------------------------------------------------------------------------------------

SIZES = {
    # Every module of the original at toy widths. The LM is built by the original `MambaVLM` / `MambaLMHeadModel` from a
    # smaller `MambaConfig`; the towers by the original `DinoSigLIPViTBackbone` through `timm.create_model` with the real
    # variant names and overridden widths (same classes and flags: DINOv2 reg4 + no_embed_class + LayerScale, SigLIP
    # without class token + 'map' pool); the VQ by the original LlamaGen `VQModel` with `Encoder`/`Decoder` of 32 base
    # channels. Unchanged: the T2I layout (68 caption slots, 16×16 = 256 image tokens, 329 T2I positions), the
    # 1500-row MMU table, LoRA r 8 / alpha 32, the special-token arithmetic (base vocabulary ≡ 5 mod 16, as 50277).
    # Mamba-2: d_model 32, expand 2, head_dim 8 → 8 heads, d_state 32: the in_proj width 2·64 + 2·32 + 8 = 200 must be
    # a multiple of 8 (causal-conv1d's channel-last kernel needs strides that are multiples of 8; 8512 is).
    "tiny": dict(
        omnimamba_model="OmniMamba-tiny",
        mamba=dict(d_model=32, n_layer=2, vocab_size=293, vqvae_vocab_size=64, num_tokens=256,
                   ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 8}),  # fmt: skip
        base_vocab=293,
        image_size=42,  # 3×3 = 9 patches of 14 px
        towers={
            "vit_large_patch14_reg4_dinov2": dict(embed_dim=32, depth=3, num_heads=2),
            "vit_so400m_patch14_siglip_384": dict(embed_dim=24, depth=3, num_heads=2, mlp_ratio=2.5),
        },
        heads=dict(dino_num_attention_heads=2, siglip_num_attention_heads=2),
        vq=dict(codebook_size=64, codebook_embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1), num_res_blocks=1),
        vq_image_size=32,
        mmu_new_tokens=16,
        decoders=("auto", "eager", "static"),
    ),
    "full": dict(
        omnimamba_model="OmniMamba-1.3B",
        mamba=None,  # the original's own OmniMamba_1_3B
        base_vocab=50277,
        image_size=384,
        towers={},
        heads=dict(dino_num_attention_heads=16, siglip_num_attention_heads=16),
        vq=None,  # the original's own VQ_16
        vq_image_size=256,
        mmu_new_tokens=32,
        decoders=("auto", "eager"),
    ),
}
CAPTION_SLOTS = 68  # scripts/inference_t2i.py: max_token_len
MMU_QUESTION = "What is this?"
MMU_ANSWER = " A red bicycle leaning against a wall.<|endoftext|>"
T2I_CAPTIONS = [
    "A photo of a red bicycle leaning against a wall.",
    # longer than the 68 caption slots even with GPT-NeoX-20B merges: the original keeps the FIRST 68 tokens (§8 #21)
    "The quick brown fox jumps over the lazy dog while a handwritten digit seven, a cat sitting next to a dog and a "
    "red bicycle leaning against a wall are shown on a dark background; zero one two three four five six seven "
    "eight nine, again and again, in great detail.",
]
BATCH = 2


LOG_TAG = ""


def log(*a):
    print(f"[parity{LOG_TAG} {time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---- tokenizers ---------------------------------------------------------------------------------------------------------


def base_tokenizer_json(size: str) -> str:
    """A GPT-NeoX-style byte-level BPE (`<|endoftext|>` = 0, `<|padding|>` = 1, no BOS/EOS). `tiny`: the test suite's
    293-id tokenizer. `full`: the same merges, the vocabulary filled with unreachable entries up to 50277 ids (only the
    ids matter: GPT-NeoX-20B's own files are a download)."""
    from common import base_tokenizer_json as train

    text = train(SIZES["tiny"]["base_vocab"])
    if size == "tiny":
        return text
    data = json.loads(text)
    vocab = data["model"]["vocab"]
    n = max(vocab.values()) + 1
    for i in range(n, SIZES["full"]["base_vocab"]):
        vocab[f"<|unused_{i}|>"] = i
    return json.dumps(data)


def make_base_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return tok


# ---- the original, offline --------------------------------------------------------------------------------------------

PATCHES: list[str] = []


def install_offline_patches(original: Path, size: str, base_tokenizer, workdir: Path) -> dict:
    """Import the original from `original` and patch, at run time, only what it needs to run offline on this stack.
    Returns the modules the harness uses."""
    import torch

    spec = SIZES[size]
    sys.path.insert(0, str(original))

    # (1) transformers >= 5 removed GreedySearchDecoderOnlyOutput / SampleDecoderOnlyOutput, which
    #     models/stage2/generation.py imports (spec §9.4): alias both to GenerateDecoderOnlyOutput (same fields used).
    import transformers.generation as tg
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    for name in ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput"):
        if name not in vars(tg):
            try:
                getattr(tg, name)
            except (AttributeError, ImportError, RuntimeError):
                setattr(tg, name, GenerateDecoderOnlyOutput)
                PATCHES.append(f"transformers.generation.{name} = GenerateDecoderOnlyOutput (removed in transformers 5)")

    import timm

    import models.cobra.backbones.vision.dinosiglip_vit as dsv
    import models.cobra.materialize as mat
    import models.mamba_vlm as mv
    from llamagen_tokenizer.tokenizer_image import vq_model as vqm
    from models.stage2.config_mamba import MambaConfig

    # (2) AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b") -> the local stand-in (a download otherwise).
    class _LocalAutoTokenizer:
        @staticmethod
        def from_pretrained(name, **kwargs):
            tok = copy.deepcopy(base_tokenizer)
            tok.model_max_length = kwargs.get("model_max_length", tok.model_max_length)
            return tok

    mv.AutoTokenizer = _LocalAutoTokenizer
    PATCHES.append(f"models.mamba_vlm.AutoTokenizer -> local GPT-NeoX-style stand-in ({len(base_tokenizer)} ids)")

    # (3) VQ. mamba_vlm.py calls hf_hub_download without importing it (spec §8 #15, a NameError at HEAD): provide one
    #     that writes a local {"model": state_dict} of a freshly built VQ (random; re-randomised with everything else),
    #     which the original then loads strictly, as it would the LlamaGen checkpoint.
    if spec["vq"] is not None:
        v = spec["vq"]
        vq_builder_orig = mv.llamagen_VQ_models["VQ-16"]

        def tiny_vq(**kwargs):
            model = vqm.VQModel(vqm.ModelArgs(codebook_size=v["codebook_size"], codebook_embed_dim=v["codebook_embed_dim"],
                                              z_channels=v["z_channels"], encoder_ch_mult=list(v["ch_mult"]),
                                              decoder_ch_mult=list(v["ch_mult"])))  # fmt: skip
            # Encoder/Decoder take the base width and res-block count as constructor arguments that VQModel does not
            # forward (it always uses 128 / 2): rebuild both with the original classes at 32 / 1.
            model.encoder = vqm.Encoder(ch=v["ch"], ch_mult=v["ch_mult"], num_res_blocks=v["num_res_blocks"],
                                        z_channels=v["z_channels"])  # fmt: skip
            model.decoder = vqm.Decoder(z_channels=v["z_channels"], ch=v["ch"], ch_mult=v["ch_mult"],
                                        num_res_blocks=v["num_res_blocks"])  # fmt: skip
            return model

        mv.llamagen_VQ_models = {**mv.llamagen_VQ_models, "VQ-16": tiny_vq}
        PATCHES.append(f"models.mamba_vlm.llamagen_VQ_models['VQ-16'] -> VQModel with Encoder/Decoder(ch={v['ch']}, "
                       f"ch_mult={v['ch_mult']}, num_res_blocks={v['num_res_blocks']}, z_channels={v['z_channels']}), "
                       f"codebook {v['codebook_size']}x{v['codebook_embed_dim']} (was {vq_builder_orig.__name__})")  # fmt: skip

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        path = workdir / f"random_{filename}"
        if not path.exists():
            vq = mv.llamagen_VQ_models["VQ-16"]()
            torch.save({"model": vq.state_dict()}, path)
        return str(path)

    mv.hf_hub_download = hf_hub_download
    PATCHES.append("models.mamba_vlm.hf_hub_download (missing import, §8 #15) -> a local random VQ checkpoint")

    # (4) timm towers: pretrained=False (a download otherwise); tiny: the real variant names with smaller widths.
    create_orig = timm.create_model
    towers = spec["towers"]

    def create_model(model_name, pretrained=False, **kwargs):
        kwargs.update(towers.get(model_name.split(".")[0], {}))
        return create_orig(model_name, pretrained=False, **kwargs)

    timm.create_model = create_model
    PATCHES.append("timm.create_model(..., pretrained=True) -> pretrained=False"
                   + (f"; tiny widths {towers}" if towers else ""))  # fmt: skip

    # (5) timm >= 1.0: get_intermediate_layers returns a list, the original unwraps tuples only (spec §9.1).
    def unpack_tuple(fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            return result[0] if isinstance(result, (tuple, list)) else result

        return wrapper

    dsv.unpack_tuple = unpack_tuple
    PATCHES.append("dinosiglip_vit.unpack_tuple also unwraps lists (timm >= 1.0, §9.1)")

    # (6) tiny only: a registered LM size and a smaller image size for the vision registry entry.
    if spec["mamba"] is not None:
        mcfg = spec["mamba"]

        def omnimamba_tiny(t2i_task, mmu_task, **kwargs):
            return mv.MambaVLM(MambaConfig(**mcfg, adaln_group=True, num_groups=4, t2i_task=t2i_task,
                                           mmu_task=mmu_task, **kwargs))  # fmt: skip

        mv.MambaVLMs[spec["omnimamba_model"]] = omnimamba_tiny
        PATCHES.append(f"models.mamba_vlm.MambaVLMs['{spec['omnimamba_model']}'] = MambaVLM(MambaConfig({mcfg}, "
                       "adaln_group=True, num_groups=4))")  # fmt: skip
    if spec["image_size"] != 384:
        entry = mat.VISION_BACKBONES["dinosiglip-vit-so-384px"]
        mat.VISION_BACKBONES["dinosiglip-vit-so-384px"] = {**entry, "kwargs": {"default_image_size": spec["image_size"]}}
        PATCHES.append(f"VISION_BACKBONES['dinosiglip-vit-so-384px'] default_image_size {spec['image_size']}")

    from util import conversation as conversation_lib

    from models.omnimamba import OmniMamba

    return {"OmniMamba": OmniMamba, "mv": mv, "vqm": vqm, "conversation": conversation_lib, "timm": timm}


def build_original(mods, original: Path, size: str):
    import yaml

    with open(original / "config" / "config_stage2.yaml") as f:
        config = yaml.safe_load(f)["train"]
    config["vq_model"] = "VQ-f16"  # as both inference scripts
    config["omnimamba_model"] = SIZES[size]["omnimamba_model"]
    args = argparse.Namespace(**config)
    model = mods["OmniMamba"](args, stage="inference")
    up = model.llm_backbone.uni_prompting
    if any(v.device.type != "cpu" for v in up.sptids_dict.values()):
        # built under a CUDA default device: the original builds these id tensors on the CPU (its scripts and
        # OmniMamba.forward combine them with CPU tensors and move the result), so keep them there
        up.sptids_dict = {k: v.cpu() for k, v in up.sptids_dict.items()}
    if size == "tiny":
        # mmu_uni_ids2embed (text-only layout) inserts `img_sq_len` zero embeddings, hard-coded 729 (= 27²)
        grid = SIZES[size]["image_size"] // 14
        model.llm_backbone.mamba.backbone.img_sq_len = grid * grid
        PATCHES.append(f"backbone.img_sq_len = {grid * grid} (hard-coded 729 = the 384-px patch count)")
    return model.eval()


# ---- random weights ---------------------------------------------------------------------------------------------------


def _init_tensor(name: str, shape, gen, device):
    import torch

    def randn(std):
        return torch.randn(shape, generator=gen, device=device) * std

    def rand(lo, hi):
        return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo

    last = name.rsplit(".", 1)[-1]
    ndim = len(shape)
    if name.endswith("quantize.codebook_used"):
        return torch.zeros(shape, device=device)
    if last == "A_log":
        return torch.log(rand(1.0, 16.0))
    if last == "dt_bias":
        dt = torch.exp(rand(math.log(1e-3), math.log(1e-1)))
        return dt + torch.log(-torch.expm1(-dt))
    if last == "D" and ".mixer." in name:
        return rand(0.5, 1.5)
    if "lora_B" in name:  # zero at the original's init (a no-op adapter): random here, so the adapters are tested
        return randn(0.03)
    if last == "gamma":  # LayerScale (1e-5 at init would mute the DINOv2 blocks)
        return rand(0.3, 1.0)
    if last in ("cls_token", "reg_token", "latent"):
        return randn(0.5)
    if last in ("pos_embed", "mmu_pos_embed"):
        return randn(0.3)
    if name.endswith(("backbone.embedding.weight", "word_embeddings.weight", "quantize.embedding.weight",
                      "lm_head.weight", "img_head.weight")):  # fmt: skip
        return randn(0.5)
    if ndim == 1 and "norm" in name and last == "weight":
        return 1.0 + randn(0.1)
    if ndim == 1 and "norm" in name and last == "bias":
        return randn(0.05)
    if name.endswith(".mixer.conv1d.weight"):
        return randn(0.5)
    if name.endswith(".mixer.conv1d.bias"):
        return randn(0.1)
    if last == "weight" and ndim >= 2:
        return randn(1.0 / math.sqrt(math.prod(shape[1:])))
    if last == "bias" and ndim == 1:
        return randn(0.02)
    raise KeyError(f"no randomisation rule for {name} {tuple(shape)}")


def randomize_(model, seed: int) -> int:
    """Every floating tensor of the state dict (tied aliases once) from its own generator seeded by (seed, name), then
    rounded to fp16-representable values (the released checkpoint is fp16). Returns the number of tensors."""
    import torch

    seen = set()
    n = 0
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            gen = torch.Generator(device=t.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
            value = _init_tensor(name, tuple(t.shape), gen, t.device)
            t.data.copy_(value.half().to(t.dtype))
            n += 1
    return n




# ---- inputs -----------------------------------------------------------------------------------------------------------


def synthetic_image(h: int, w: int, seed: int):
    """A deterministic RGB uint8 image: smooth colour gradients, a few discs, mild noise."""
    import numpy as np

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def original_mmu_prompt_ids(mods, tokenizer, question: str):
    """scripts/inference_mmu.py: conv_templates["phi1.5"], `.strip()`, tokenized without special tokens added."""
    conv = mods["conversation"].conv_templates["phi1.5"].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt().strip()
    return prompt, tokenizer(prompt, return_tensors="pt", padding="longest").input_ids[0]


def original_t2i_ids(model, caption: str):
    """scripts/inference_t2i.py, line for line (68 caption slots, left padding, first 68 tokens kept)."""
    import torch

    up = model.llm_backbone.uni_prompting
    max_token_len = CAPTION_SLOTS
    text_ids = torch.tensor(up.text_tokenizer(caption).input_ids)
    caption_ids_padding = torch.fill_(torch.zeros(max_token_len, dtype=torch.long), up.text_tokenizer.pad_token_id)
    feat_len = min(text_ids.size(0), max_token_len)
    caption_ids_padding[-feat_len:] = text_ids[:feat_len]
    t2i_prompt_text = torch.cat([up.sptids_dict["<|t2i|>"], up.sptids_dict["<|sot|>"], up.sptids_dict["<|eot|>"],
                                 up.sptids_dict["<|soi|>"]])  # fmt: skip
    return torch.cat([t2i_prompt_text[:2], caption_ids_padding, t2i_prompt_text[2:]])


def make_inputs(mods, model, size: str, seed: int):
    import PIL.Image
    import torch

    spec = SIZES[size]
    up = model.llm_backbone.uni_prompting
    tok = up.text_tokenizer
    g = torch.Generator().manual_seed(seed + 17)
    inputs, texts = {}, {}

    # MMU: two images of different sizes / aspect ratios, one question (the original batches equal-length prompts)
    raw = [synthetic_image(37, 50, seed + 1), synthetic_image(61, 61, seed + 2)]
    for i, a in enumerate(raw):
        inputs[f"mmu_image_{i}"] = torch.from_numpy(a)
    transform = model.vision_backbone.image_transform
    pv = [transform(PIL.Image.fromarray(a).convert("RGB")) for a in raw]
    inputs["mmu_pixel_dino"] = torch.stack([p["dino"] for p in pv])
    inputs["mmu_pixel_siglip"] = torch.stack([p["siglip"] for p in pv])
    prompt, prompt_ids = original_mmu_prompt_ids(mods, tok, MMU_QUESTION)
    texts["mmu_prompts"] = [prompt] * BATCH
    specials = torch.cat([up.sptids_dict[t] for t in ("<|mmu|>", "<|soi|>", "<|eoi|>", "<|sot|>")])
    inputs["mmu_input_ids"] = torch.cat([specials, prompt_ids]).long()[None].repeat(BATCH, 1)
    answer = torch.tensor(tok(MMU_ANSWER).input_ids)
    inputs["mmu_loss_input_ids"] = torch.cat([prompt_ids, answer]).long()[None].repeat(BATCH, 1)
    inputs["mmu_loss_labels"] = torch.cat([torch.full_like(prompt_ids, -100), answer]).long()[None].repeat(BATCH, 1)

    # T2I
    texts["t2i_captions"] = list(T2I_CAPTIONS)
    inputs["t2i_input_ids"] = torch.stack([original_t2i_ids(model, c) for c in T2I_CAPTIONS]).long()
    eoi = up.sptids_dict["<|eoi|>"].long()
    inputs["t2i_caption_ids_train"] = torch.cat([inputs["t2i_input_ids"], eoi[None].repeat(BATCH, 1)], dim=1)
    n_codes = model.llm_backbone.vqvae.quantize.n_e
    n_tok = model.llm_backbone.num_tokens
    inputs["t2i_image_ids"] = torch.randint(0, n_codes, (BATCH, n_tok), generator=g)
    inputs["vq_codes"] = torch.randint(0, n_codes, (BATCH, n_tok), generator=g)
    r = spec["vq_image_size"]
    low = torch.randn(BATCH, 3, 8, 8, generator=g)
    inputs["vq_images"] = torch.tanh(torch.nn.functional.interpolate(low, size=(r, r), mode="bicubic",
                                                                      align_corners=False))  # fmt: skip
    return inputs, texts


# ---- the original side ------------------------------------------------------------------------------------------------


def run_original(model, inputs: dict, size: str, dtype, device, cg: bool) -> dict:
    """Every quantity, computed by the original's own code paths (`OmniMamba.forward`, `mmu_*_ids2embed`,
    `MambaLMHeadModel.forward` / `.generate` as `scripts/inference_mmu.py`, `t2i_generate` as
    `scripts/inference_t2i.py`, `VQModel.decode_code` / `.encode`)."""
    import torch

    spec = SIZES[size]
    lb = model.llm_backbone
    mamba = lb.mamba
    up = lb.uni_prompting
    eos = up.text_tokenizer.eos_token_id
    inp = {k: v.to(device) for k, v in inputs.items()}
    pv = {"dino": inp["mmu_pixel_dino"].to(dtype), "siglip": inp["mmu_pixel_siglip"].to(dtype)}
    ids = inp["mmu_input_ids"]
    prompt_ids = ids[:, 4:]
    out = {}
    with torch.no_grad():
        feats = model.vision_backbone(pv)
        out["vision_features"] = feats
        out["image_embeddings"] = model.projector(feats)
        log("  original: vision")

        # MMU logits (training path: the fused Mamba-2 kernel, inference_params None), with image and text-only
        emb, _ = model.mmu_multi_ids2embed(pv, prompt_ids, prompt_ids)
        out["mmu_logits"] = mamba(None, emb.to(dtype), task="mmu").mmu_logits
        emb_text, _ = model.mmu_uni_ids2embed(None, prompt_ids, prompt_ids)
        # (mmu_uni_ids2embed makes float32 zeros; in a bf16 model the original only ever ran it under autocast)
        out["mmu_text_only_logits"] = mamba(None, emb_text.to(dtype), task="mmu").mmu_logits
        log("  original: mmu logits")

        # training losses through OmniMamba.forward
        b = ids.shape[0]
        mmu_batch = {"mmu_flow": {"pixel_values": pv, "input_ids": inp["mmu_loss_input_ids"],
                                  "labels": inp["mmu_loss_labels"], "multimodal_indices": torch.arange(b, device=device)}}  # fmt: skip
        out["mmu_loss"] = model(mmu_batch, task="mmu")
        captured = {}
        hook = mamba.register_forward_hook(lambda mod, a, o: captured.__setitem__("t2i", o.t2i_logits))
        try:
            t2i_batch = {"t2i_flow": {"inputs": inp["t2i_image_ids"], "caption_ids": inp["t2i_caption_ids_train"]}}
            out["t2i_loss"] = model(t2i_batch, task="t2i")
        finally:
            hook.remove()
        out["t2i_logits"] = captured["t2i"]
        log("  original: losses, t2i logits")

        # VQ
        vq = lb.vqvae
        n, grid = inp["vq_codes"].shape[0], int(math.isqrt(lb.num_tokens))
        out["vq_decode"] = vq.decode_code(inp["vq_codes"], shape=[n, vq.config.codebook_embed_dim, grid, grid])
        _, _, info = vq.encode(inp["vq_images"].to(dtype))
        out["vq_encode"] = info[2].view(n, -1)
        log("  original: vq")

    # greedy MMU, as scripts/inference_mmu.py (max_length = prompt positions + new tokens instead of 2048)
    new = spec["mmu_new_tokens"]

    def generate(input_ids, input_embeddings, task, max_length):
        mamba._decoding_cache = None  # keyed without the task (§5.3): never share it between tasks
        result = type(mamba).generate(mamba, input_ids=input_ids, input_embeddings=input_embeddings, cond=None,
                                      eos_token_id=eos if task == "mmu" else None, max_length=max_length,
                                      temperature=1.0, top_p=0.0, top_k=1, cg=cg, task=task,
                                      return_dict_in_generate=True, output_scores=True)  # fmt: skip
        mamba._decoding_cache = None
        return result

    with torch.no_grad():
        images_feat = model.vision_backbone(pv)
        images_embeddings = model.projector(images_feat)
        text_embeddings = lb.embed_input_ids(ids)
        part1, part2 = text_embeddings[:, :2, :], text_embeddings[:, 2:, :]
        emb = torch.cat((part1, images_embeddings, part2), dim=1)
    for name, e in (("mmu_greedy", emb), ("mmu_text_only_greedy", emb_text.to(dtype))):
        res = generate(ids, e, "mmu", e.shape[1] + new)
        out[name] = res.sequences[:, ids.shape[1]:]
        out[name + "_logits"] = torch.stack(list(res.scores), dim=1)
        log(f"  original: {name}")

    # greedy T2I through the real entry point t2i_generate (fast=cg), capturing the decoder's tokens and scores
    got = {}

    def generate_t2i(*args, **kwargs):
        kwargs.update(return_dict_in_generate=True, output_scores=True)
        res = type(mamba).generate(mamba, *args, **kwargs)
        got["scores"] = res.scores
        return res.sequences

    decode_orig = lb.decode_to_img

    def decode_to_img(index):
        got["tokens"] = index
        return decode_orig(index)

    mamba.generate, lb.decode_to_img = generate_t2i, decode_to_img
    try:
        mamba._decoding_cache = None
        with torch.no_grad():
            imgs = model.t2i_generate(text_ids=inp["t2i_input_ids"], temperature=1.0, top_p=0.0, top_k=1, fast=cg)
    finally:
        del mamba.generate, lb.decode_to_img
    out["t2i_greedy"] = got["tokens"]
    out["t2i_greedy_logits"] = torch.stack(list(got["scores"]), dim=1)
    out["t2i_images"] = imgs
    return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()) for k, v in out.items()}


def original_preprocess(model, inputs) -> "torch.Tensor":
    import torch

    return torch.stack([inputs["mmu_pixel_dino"], inputs["mmu_pixel_siglip"]], dim=1)


def greedy_margins(outputs: dict) -> dict:
    """Smallest top-1 minus top-2 logit gap along each greedy path of the original (how far from a tie)."""
    out = {}
    for name in ("mmu_greedy_logits", "mmu_text_only_greedy_logits", "t2i_greedy_logits"):
        if name in outputs:
            top = outputs[name].double().topk(2, dim=-1).values
            out[name] = float((top[..., 0] - top[..., 1]).min())
    return out


# ---- the port side ----------------------------------------------------------------------------------------------------


def run_port_all(model, processor, inputs, texts, size, decoders) -> dict:
    from parity import golden

    out = {"forward": golden.run_port_forward(model, inputs)}
    log("  port: forward quantities")
    for d in decoders:
        out[d] = golden.run_port_generation(model, inputs, SIZES[size]["mmu_new_tokens"], decoder=d)
        log(f"  port: generation, decoder {d}")
    if processor is not None:
        out["forward"].update({k: v for k, v in golden.port_ids(processor, texts).items()})
        out["forward"]["preprocess"] = golden.port_preprocess(processor, inputs)
    return out


def merged(port: dict, decoder: str) -> dict:
    return {**port["forward"], **port[decoder]}


# ---- main -------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "tokenizers", "timm", "torchvision", "mamba_ssm", "causal_conv1d", "triton",
                 "safetensors", "accelerate"):  # fmt: skip
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            try:
                out[name] = getattr(__import__(name), "__version__", "?")
            except Exception:
                out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True, type=Path, help="checkout of hustvl/OmniMamba (b372978)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tf32", action="store_true", help="keep TF32 / Triton TF32 dots (the released numerics)")
    ap.add_argument("--autotune", action="store_true", help="let mamba-ssm autotune its Triton kernels")
    ap.add_argument("--cpu-stubs", action="store_true", help="dry run with tests/parity/cpu_stubs (not golden)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; later stages are skipped after it")
    ap.add_argument("--no-fixture", action="store_true")
    ap.add_argument("--stop-after", choices=("built", "converted"), default=None, help="dry runs: stop early")
    args = ap.parse_args(argv)
    global LOG_TAG
    LOG_TAG = f" {args.size}"
    t_start = time.time()
    if not args.tf32:
        os.environ["TRITON_F32_DEFAULT"] = "ieee"  # before Triton compiles anything: IEEE fp32 dots in the kernels
    if not args.autotune:
        # mamba-ssm's deterministic mode: one (the cheapest) config per autotuned Triton kernel instead of a benchmark
        # of 5-20 compiled configs per kernel, shape and dtype (minutes of JIT on a fresh machine). Same math.
        os.environ.setdefault("MAMBA_DETERMINISTIC", "1")
    if args.cpu_stubs:
        # import transformers' image / model utilities and the port first: they must not see the stand-ins
        import transformers.image_utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

        import omnimamba_hf  # noqa: F401
        import omnimamba_hf.processing  # noqa: F401

        sys.path.insert(0, str(HERE.parent / "cpu_stubs"))
        os.environ["OMNIMAMBA_DISABLE_KERNELS"] = "1"
        import torch

        if not torch.cuda.is_available():  # the original's decode() creates CUDA events unconditionally

            class _Event:
                def __init__(self, *a, **k):
                    pass

                def record(self, *a, **k):
                    pass

            torch.cuda.Event = _Event
    import torch

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    numerics = {k: os.environ.get(k) for k in ("TRITON_F32_DEFAULT", "MAMBA_DETERMINISTIC")}
    try:
        import triton

        numerics["triton.knobs.language.fp32_default"] = str(triton.knobs.language.fp32_default)
    except Exception as e:  # older/newer Triton without knobs, or no Triton
        numerics["triton.knobs"] = repr(e)[:200]
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cg = device.type == "cuda"
    spec = SIZES[args.size]
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    dtypes = [d for d in args.dtypes.split(",") if d]
    report = {"size": args.size, "seed": args.seed, "device": str(device), "tf32": args.tf32,
              "cpu_stubs": args.cpu_stubs, "numerics": numerics, "versions": versions(), "patches": PATCHES, "timings_s": {},
              "results": {}, "errors": []}  # fmt: skip

    def save_report():
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))

    def stage(name):
        report["timings_s"][name] = round(time.time() - t_start, 1)
        log(f"{name} (t={report['timings_s'][name]} s)")
        save_report()

    from parity import golden

    work = Path(tempfile.mkdtemp(prefix="omnimamba_parity_"))
    tok_json = base_tokenizer_json(args.size)
    base_tok = make_base_tokenizer(tok_json)
    mods = install_offline_patches(args.original.resolve(), args.size, base_tok, work)
    torch.manual_seed(args.seed)
    build_device = device if (args.size == "full" and device.type == "cuda") else torch.device("cpu")
    try:
        with torch.device(build_device):  # full size: built on the GPU (minutes of CPU init otherwise)
            original = build_original(mods, args.original.resolve(), args.size)
    except Exception:
        if build_device.type == "cpu":
            raise
        report["errors"].append({"stage": f"build on {build_device} (retried on cpu)", "traceback": traceback.format_exc()})
        log(traceback.format_exc())
        build_device = torch.device("cpu")
        original = build_original(mods, args.original.resolve(), args.size)
    stage(f"built original on {build_device}")
    n = randomize_(original, args.seed)
    original.to(device)
    report["randomized_tensors"] = n
    sd = original.state_dict()  # views of the live tensors (the tied aliases as separate keys, as in the release)
    report["original_state_dict_entries"] = len(sd)
    report["original_parameters"] = sum(p.numel() for p in original.parameters())
    stage("randomized")
    if args.stop_after == "built":
        return 0

    inputs, texts = make_inputs(mods, original, args.size, args.seed)
    eos = original.llm_backbone.uni_prompting.text_tokenizer.eos_token_id
    ref = {}
    try:
        if args.stop_after:
            raise RuntimeError("--stop-after: the original is not run")
        ref = run_original(original, inputs, args.size, torch.float32, device, cg)
        ref["preprocess"] = original_preprocess(original, inputs)
        ref["ids_t2i"] = inputs["t2i_input_ids"]
        report["original_greedy_margins"] = greedy_margins(ref)
    except Exception:
        report["errors"].append({"stage": "original fp32", "traceback": traceback.format_exc()})
        log(traceback.format_exc())
    stage("original fp32")

    # save the original-layout state dict (fp16 values, tied copies separate) and convert it with the project's converter
    from safetensors.torch import load_file, save_file

    weights_path = out_dir / "weights_original.safetensors"
    keep = {k: v.to("cpu", torch.float16).contiguous() for k, v in sd.items()
            if v.is_floating_point() and not k.endswith("quantize.codebook_used")}  # fmt: skip
    if args.size == "tiny" and not args.no_fixture:
        save_file(keep, str(weights_path), metadata={"format": "pt", "layout": "original OmniMamba.state_dict()"})
        loaded = {k: v.float() for k, v in load_file(str(weights_path)).items()}
        loaded["llm_backbone.vqvae.quantize.codebook_used"] = torch.zeros(65536)
    else:
        loaded = {k: v.float() for k, v in sd.items()}  # no copy: the port shares the (read-only) fp32 storage
    del keep
    conversion = dict(t2i_caption_length=CAPTION_SLOTS, **spec["heads"])
    port = golden.convert_original(loaded, base_tok, conversion, torch.float32).to(device).eval()
    del loaded
    processor = None
    try:
        from omnimamba_hf.processing import OmniMambaImageProcessor, OmniMambaProcessor
        from omnimamba_hf.processing.tokenization_omnimamba import build_omnimamba_tokenizer

        s = spec["image_size"]
        image_processor = OmniMambaImageProcessor(size={"height": s, "width": s})
        processor = OmniMambaProcessor.from_config(port.config, build_omnimamba_tokenizer(base_tok), image_processor)
    except Exception:
        report["errors"].append({"stage": "processor", "traceback": traceback.format_exc()})
        log(traceback.format_exc())
    report["port_config"] = {"text_vocab_size": port.config.text_vocab_size,
                             "image_vocab_size": port.config.image_vocab_size,
                             "num_image_tokens": port.config.num_image_tokens,
                             "hidden_size": port.config.text_config.hidden_size,
                             "num_hidden_layers": port.config.text_config.num_hidden_layers}  # fmt: skip
    stage("converted")
    if args.stop_after == "converted":
        return 0

    decoders = [d for d in spec["decoders"] if device.type == "cuda" or d != "auto"] or ["eager"]
    port32 = {}
    try:
        port32 = run_port_all(port, processor, inputs, texts, args.size, decoders)
        if ref:
            ref["ids_mmu"] = golden.port_mmu_ids(port.config, inputs["mmu_input_ids"])
            for d in decoders:
                rows = golden.compare_outputs(ref, merged(port32, d), eos=eos)
                report["results"][f"fp32/{d}"] = [r.as_dict() for r in rows]
                log(f"fp32, port decoder {d}:\n" + golden.format_rows(rows))
    except Exception:
        report["errors"].append({"stage": "port fp32", "traceback": traceback.format_exc()})
        log(traceback.format_exc())
    stage("port fp32")

    # the golden fixture (tiny)
    if args.size == "tiny" and not args.no_fixture and ref:
        tensors = {k: v.contiguous() for k, v in ref.items() if k != "preprocess"}  # = the pixel inputs
        save_file(tensors, str(out_dir / "outputs.safetensors"))
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(out_dir / "inputs.safetensors"))
        (out_dir / "tokenizer.json").write_text(tok_json)

    def finish():
        ok = all(r["ok"] for k, rows in report["results"].items() if k.startswith("fp32") for r in rows)
        report["fp32_all_ok"] = bool(ok and report["results"] and not report["errors"])
        report["total_s"] = round(time.time() - t_start, 1)
        if args.size == "tiny" and not args.no_fixture and ref:
            meta = {
                "what": "golden references of the ORIGINAL OmniMamba (hustvl/OmniMamba b372978) at the tiny "
                        "configuration, recorded by tests/parity/run_original_parity.py; checked by "
                        "tests/test_parity_golden.py",
                "original_commit": "b372978",
                "seed": args.seed,
                "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items() if k != "decoders"},
                "conversion": conversion,
                "mmu_new_tokens": spec["mmu_new_tokens"],
                "eos_token_id": eos,
                "texts": texts,
                "numerics": "float32 on CUDA, TF32 off (cuBLAS, cuDNN), Triton dots IEEE fp32 (TRITON_F32_DEFAULT=ieee), "
                            f"MAMBA_DETERMINISTIC={os.environ.get('MAMBA_DETERMINISTIC')}"
                            if device.type == "cuda" and not args.tf32 else f"{device.type}, tf32={args.tf32}",
                "original_greedy_margins": report.get("original_greedy_margins"),
                "tolerances": {"fp32": golden.FP32_TOL, "pixels": golden.PIXEL_TOL},
                "harness": {k: report.get(k) for k in ("versions", "numerics", "patches", "device", "cpu_stubs",
                                                       "results", "errors", "fp32_all_ok", "original_parameters",
                                                       "original_state_dict_entries", "timings_s")},
                "sha256": {p.name: sha256(p) for p in sorted(out_dir.glob("*.safetensors"))},
            }
            (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        save_report()

    finish()  # the fixture is complete before the (optional) bf16 stage

    # bf16: both models cast, same inputs; compared with the fp32 original
    if "bf16" in dtypes and ref and time.time() - t_start < args.deadline:
        try:
            original.to(torch.bfloat16)
            ref16 = run_original(original, inputs, args.size, torch.bfloat16, device, cg)
            stage("original bf16")
            port.to(torch.bfloat16)
            port.reset_graph_decoders()
            port16 = run_port_all(port, None, inputs, texts, args.size, decoders[:1])
            d = decoders[0]
            report["results"][f"bf16/{d}"] = golden.bf16_rows(ref, ref16, merged(port16, d), eos=eos)
            for r in report["results"][f"bf16/{d}"]:
                log("bf16", json.dumps(r))
        except Exception:
            report["errors"].append({"stage": "bf16", "traceback": traceback.format_exc()})
            log(traceback.format_exc())
        stage("bf16")
        finish()
    log(f"done in {report['total_s']} s; fp32 all ok: {report['fp32_all_ok']}")
    return 0 if report["fp32_all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
