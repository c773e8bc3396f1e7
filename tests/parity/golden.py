r"""The port side of the parity checks, the tolerances and the comparison, shared by the GPU harness
(`run_original_parity.py`) and the CPU golden test (`tests/test_parity_golden.py`).

Every quantity is computed from the same inputs on both sides; `inputs` is a dict of tensors (the fixture file
`inputs.safetensors`), whose ids are the ORIGINAL's token layouts:

| input | shape | what |
| --- | --- | --- |
| `mmu_input_ids` | (B, 4+T) | `<\|mmu\|> <\|soi\|> <\|eoi\|> <\|sot\|>` + tokens("USER: {q} ASSISTANT:"), as `scripts/inference_mmu.py` |
| `mmu_pixel_dino`, `mmu_pixel_siglip` | (B, 3, S, S) | the original's `image_transform` of the two images |
| `mmu_image_{i}` | (H, W, 3) uint8 | the raw images (preprocessing parity) |
| `mmu_loss_input_ids`, `mmu_loss_labels` | (B, T2) | a fine-tune style sample (prompt + answer), labels -100 on the prompt |
| `t2i_input_ids` | (B, 72) | `<\|t2i\|> <\|sot\|>` + 68 left-padded caption slots + `<\|eot\|> <\|soi\|>`, as `scripts/inference_t2i.py` |
| `t2i_caption_ids_train` | (B, 73) | the training layout (+ `<\|eoi\|>`) |
| `t2i_image_ids` | (B, grid²) | VQ codes for the teacher-forced T2I logits and the T2I loss |
| `vq_codes` | (B, grid²) | codes to decode |
| `vq_images` | (B, 3, R, R) | images in [-1, 1] to encode |

The port side maps them onto the port's one id space (image placeholders, `text_vocab_size + code`) exactly as its
processor does (the processor's own ids are compared too, as `ids_mmu` / `ids_t2i`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "parity_tiny"

# ---- tolerances ----------------------------------------------------------------------------------------------------
# float quantities: max |port - original| <= tol * scale, scale = max(1, max |original|)  ("relative to scale")
FP32_TOL = 1e-4
# bf16: the port's deviation from the fp32 original may be at most BF16_RATIO x the original's own bf16 deviation
# (+ BF16_FLOOR x scale, for quantities the original computes (almost) exactly in bf16)
BF16_RATIO = 3.0
BF16_FLOOR = 2e-2
PIXEL_TOL = 1e-5  # preprocessing: absolute, in normalised units (one float32 ulp of x/255 vs x*(1/255) is ~6e-8)

# name -> kind. "float": tensor compared by the scaled max-abs rule; "ids": exact; "greedy": exact up to and including
# the first eos of each row (the original keeps sampling finished rows, the port pads them); "greedy_logits": float
# rule over the steps whose prefix is identical on both sides (its companion sequence named in GREEDY_PAIRS).
QUANTITIES: dict[str, str] = {
    "ids_mmu": "ids",
    "ids_t2i": "ids",
    "preprocess": "pixels",
    "vision_features": "float",
    "image_embeddings": "float",
    "mmu_logits": "float",
    "mmu_text_only_logits": "float",
    "mmu_loss": "float",
    "t2i_logits": "float",
    "t2i_loss": "float",
    "mmu_greedy": "greedy",
    "mmu_greedy_logits": "greedy_logits",
    "mmu_text_only_greedy": "greedy",
    "mmu_text_only_greedy_logits": "greedy_logits",
    "t2i_greedy": "greedy",
    "t2i_greedy_logits": "greedy_logits",
    "t2i_images": "float",
    "vq_decode": "float",
    "vq_encode": "ids",
}
GREEDY_PAIRS = {
    "mmu_greedy_logits": "mmu_greedy",
    "mmu_text_only_greedy_logits": "mmu_text_only_greedy",
    "t2i_greedy_logits": "t2i_greedy",
}
# quantities that depend on the decoder (the port's generate(decoder=...)); the others are computed once
DECODER_QUANTITIES = ("mmu_greedy", "mmu_greedy_logits", "mmu_text_only_greedy", "mmu_text_only_greedy_logits",
                      "t2i_greedy", "t2i_greedy_logits", "t2i_images")  # fmt: skip


# ---- the port side ---------------------------------------------------------------------------------------------------


def port_mmu_ids(config, original_ids: torch.Tensor) -> torch.Tensor:
    """The original's `[<|mmu|>, <|soi|>, <|eoi|>, <|sot|>] + prompt` ids → the port's layout with the image slots
    (`<image>` × num_image_tokens between `<|soi|>` and `<|eoi|>`)."""
    b = original_ids.shape[0]
    slots = torch.full((b, config.num_image_tokens), config.image_token_id, dtype=torch.long)
    return torch.cat([original_ids[:, :2], slots, original_ids[:, 2:]], dim=1)


def port_inputs(config, inputs: dict) -> dict:
    """All port-side inputs derived from the original-layout `inputs`."""
    V, P = config.text_vocab_size, config.num_image_tokens
    specials = inputs["mmu_input_ids"][:, :4]
    b = specials.shape[0]
    loss_ids = port_mmu_ids(config, torch.cat([specials, inputs["mmu_loss_input_ids"]], dim=1))
    loss_labels = torch.cat([torch.full((b, P + 4), -100, dtype=torch.long), inputs["mmu_loss_labels"]], dim=1)
    cap = inputs["t2i_caption_ids_train"]
    codes = inputs["t2i_image_ids"]
    t2i_ids = torch.cat([cap[:, :-1], codes + V, cap[:, -1:]], dim=1)  # text[:72] ‖ image ‖ text[72] (§4.4)
    t2i_labels = torch.cat(
        [torch.full_like(cap[:, :-1], -100), codes + V, torch.full_like(cap[:, -1:], -100)], dim=1
    )
    return {
        "mmu_ids": port_mmu_ids(config, inputs["mmu_input_ids"]),
        "pixel_values": torch.stack([inputs["mmu_pixel_dino"], inputs["mmu_pixel_siglip"]], dim=1),
        "mmu_loss_ids": loss_ids,
        "mmu_loss_labels": loss_labels,
        "t2i_train_ids": t2i_ids,
        "t2i_train_labels": t2i_labels,
        "t2i_prompt_ids": inputs["t2i_input_ids"],
    }


def _cpu(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to("cpu")
    return x.float() if x.is_floating_point() else x


@torch.no_grad()
def run_port_forward(model, inputs: dict) -> dict:
    """Every quantity that does not depend on the decoder: features, full-sequence logits, losses, VQ."""
    config = model.config
    device, dtype = model.device, model.dtype
    pin = {k: v.to(device) for k, v in port_inputs(config, inputs).items()}
    pixels = pin["pixel_values"].to(dtype)
    b = pixels.shape[0]
    out = {}
    out["vision_features"] = model.model.vision_model(pixels)
    out["image_embeddings"] = model.model.get_image_features(pixels)
    out["mmu_logits"] = model(input_ids=pin["mmu_ids"], pixel_values=pixels, task="mmu", use_cache=False).logits
    no_image = torch.zeros(b, dtype=torch.bool, device=device)
    out["mmu_text_only_logits"] = model(
        input_ids=pin["mmu_ids"], image_flags=no_image, task="mmu", use_cache=False
    ).logits
    out["mmu_loss"] = model(
        input_ids=pin["mmu_loss_ids"], pixel_values=pixels, labels=pin["mmu_loss_labels"], task="mmu", use_cache=False
    ).loss
    t2i = model(input_ids=pin["t2i_train_ids"], labels=pin["t2i_train_labels"], task="t2i", use_cache=False)
    out["t2i_logits"], out["t2i_loss"] = t2i.logits, t2i.loss
    vq = model.model.vqmodel
    out["vq_decode"] = vq.decode_codes(inputs["vq_codes"].to(device))
    out["vq_encode"] = vq.encode_to_codes(inputs["vq_images"].to(device))
    return {k: _cpu(v) for k, v in out.items()}


@torch.no_grad()
def run_port_generation(model, inputs: dict, mmu_new_tokens: int, decoder: str = "auto") -> dict:
    """Greedy MMU continuations (with image, text-only) and greedy T2I sequences with their per-step logits."""
    config = model.config
    V = config.text_vocab_size
    device, dtype = model.device, model.dtype
    pin = {k: v.to(device) for k, v in port_inputs(config, inputs).items()}
    pixels = pin["pixel_values"].to(dtype)
    ids = pin["mmu_ids"]
    b, n = ids.shape
    out = {}
    common = dict(max_new_tokens=mmu_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  decoder=decoder)  # fmt: skip
    for name, extra in (("mmu_greedy", {"pixel_values": pixels}),
                        ("mmu_text_only_greedy", {"image_flags": torch.zeros(b, dtype=torch.bool, device=device)})):  # fmt: skip
        gen = model.generate(ids, **extra, **common)
        out[name] = gen.sequences[:, n:]
        out[name + "_logits"] = torch.stack(list(gen.logits), dim=1)
    gen = model.generate(
        pin["t2i_prompt_ids"], generation_mode="image", do_sample=False, return_dict_in_generate=True,
        output_logits=True, decoder=decoder,
    )  # fmt: skip
    out["t2i_greedy"] = gen.sequences - V
    out["t2i_greedy_logits"] = torch.stack(list(gen.logits), dim=1)
    out["t2i_images"] = model.decode_image_tokens(gen.sequences)
    return {k: _cpu(v) for k, v in out.items()}


def port_ids(processor, texts: dict) -> dict:
    """The port processor's own ids for the MMU prompts (raw prompt + one image each) and the T2I captions."""
    import PIL.Image

    questions, captions = texts["mmu_prompts"], texts["t2i_captions"]
    dummy = [PIL.Image.new("RGB", (16, 16)) for _ in questions]
    mmu = processor(images=dummy, text=["<image>" + q for q in questions])
    t2i = processor(text=captions, generation_mode="image")
    return {"ids_mmu": mmu["input_ids"], "ids_t2i": t2i["input_ids"]}


def port_preprocess(processor, inputs: dict) -> torch.Tensor:
    """The port image processor on the raw images: (B, 2, 3, S, S)."""
    import PIL.Image

    images = [PIL.Image.fromarray(inputs[f"mmu_image_{i}"].numpy()) for i in range(inputs["mmu_input_ids"].shape[0])]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"].float()


# ---- comparison ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    quantity: str
    kind: str
    ok: bool
    value: float | None  # float rule: max|Δ| / scale; ids: number of mismatching entries
    detail: str

    def as_dict(self):
        return {"quantity": self.quantity, "kind": self.kind, "ok": self.ok, "value": self.value, "detail": self.detail}


def _scaled_err(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    ref, got = ref.double(), got.double()
    if ref.shape != got.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    err = float((ref - got).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
    return err / scale, err, scale


def greedy_match(ref: torch.Tensor, got: torch.Tensor, eos: int | None) -> list[int]:
    """Per row: the number of leading tokens on which both agree, counted up to and including the row's first eos
    in the reference (= full agreement when it equals that length)."""
    out = []
    for r, g in zip(ref.tolist(), got.tolist()):
        if eos is not None and eos in r:
            r = r[: r.index(eos) + 1]
        k = 0
        while k < len(r) and k < len(g) and r[k] == g[k]:
            k += 1
        out.append(k)
    return out


def _greedy_len(ref: torch.Tensor, eos: int | None) -> list[int]:
    return [len(r[: r.index(eos) + 1]) if eos is not None and eos in r else len(r) for r in ref.tolist()]


def compare_one(name: str, ref: torch.Tensor, got: torch.Tensor, *, kind: str | None = None, tol: float = FP32_TOL,
                eos: int | None = None, ref_seq=None, got_seq=None) -> Row:  # fmt: skip
    kind = kind or QUANTITIES[name]
    try:
        if kind == "float":
            rel, err, scale = _scaled_err(ref, got)
            return Row(name, kind, rel <= tol, rel, f"max|Δ| {err:.3g}, scale {scale:.3g}, rel {rel:.3g} (tol {tol:g})")
        if kind == "pixels":
            _, err, _ = _scaled_err(ref, got)
            return Row(name, kind, err <= PIXEL_TOL, err, f"max|Δ| {err:.3g} (tol {PIXEL_TOL:g}, absolute)")
        if kind == "ids":
            if ref.shape != got.shape:
                return Row(name, kind, False, None, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
            bad = int((ref != got).sum())
            return Row(name, kind, bad == 0, float(bad), f"{bad} of {ref.numel()} differ")
        if kind == "greedy":
            want = _greedy_len(ref, eos)
            match = greedy_match(ref, got, eos)
            ok = match == want
            return Row(name, kind, ok, float(sum(w - m for w, m in zip(want, match))),
                       f"matching prefix per row {match} of {want}")  # fmt: skip
        if kind == "greedy_logits":
            # steps whose prefix is identical: 0 .. first mismatch (inclusive), per row
            match = greedy_match(ref_seq, got_seq, eos)
            worst, err_max, scale_max = 0.0, 0.0, 1.0
            steps = 0
            for row, m in enumerate(match):
                upto = min(m + 1, ref.shape[1], got.shape[1])
                if upto <= 0:
                    continue
                rel, err, scale = _scaled_err(ref[row, :upto], got[row, :upto])
                steps += upto
                if rel >= worst:
                    worst, err_max, scale_max = rel, err, scale
            return Row(name, kind, worst <= tol, worst,
                       f"{steps} steps compared, max|Δ| {err_max:.3g}, scale {scale_max:.3g}, rel {worst:.3g} (tol {tol:g})")  # fmt: skip
        raise ValueError(f"unknown kind {kind}")
    except Exception as e:  # a shape mismatch etc. is a failed check, not a crash of the whole comparison
        return Row(name, kind, False, None, f"error: {e}")


def _eos_for(name: str, eos: int | None) -> int | None:
    """Only text generation stops at eos; image codes include the value 0 as an ordinary code."""
    return eos if name.startswith("mmu") else None


def compare_outputs(ref: dict, got: dict, *, eos: int | None, tol: float = FP32_TOL, names=None) -> list[Row]:
    rows = []
    for name in names or QUANTITIES:
        if name not in ref or name not in got:
            continue
        kind = QUANTITIES[name]
        extra = {}
        if kind == "greedy_logits":
            seq = GREEDY_PAIRS[name]
            extra = dict(ref_seq=ref[seq], got_seq=got[seq])
        rows.append(compare_one(name, ref[name], got[name], kind=kind, tol=tol, eos=_eos_for(name, eos), **extra))
    return rows


def bf16_rows(ref32: dict, orig16: dict, port16: dict, *, eos: int | None) -> list[dict]:
    """bf16: the port's deviation from the fp32 original vs the original's own bf16 deviation (and port vs original,
    both in bf16). Float quantities pass when port_err <= BF16_RATIO * orig_err + BF16_FLOOR (all relative to scale);
    greedy sequences are reported (matching prefixes), not required to agree."""
    rows = []
    for name, kind in QUANTITIES.items():
        if name not in ref32 or name not in orig16 or name not in port16:
            continue
        if name == "t2i_images" and not (torch.equal(ref32["t2i_greedy"], orig16["t2i_greedy"])
                                         and torch.equal(ref32["t2i_greedy"], port16["t2i_greedy"])):  # fmt: skip
            rows.append(dict(quantity=name, kind=kind, ok=None, note="not comparable: the bf16 greedy codes differ"))
        elif kind == "float":
            o, _, _ = _scaled_err(ref32[name], orig16[name])
            p, _, _ = _scaled_err(ref32[name], port16[name])
            x, _, _ = _scaled_err(orig16[name], port16[name])
            ok = p <= BF16_RATIO * o + BF16_FLOOR
            rows.append(dict(quantity=name, kind=kind, ok=ok, orig_bf16_vs_fp32=o, port_bf16_vs_fp32=p,
                             port_vs_orig_bf16=x))  # fmt: skip
        elif kind == "greedy":
            e = _eos_for(name, eos)
            rows.append(dict(quantity=name, kind=kind, ok=None, reference_length=_greedy_len(ref32[name], e),
                             orig_bf16_vs_fp32=greedy_match(ref32[name], orig16[name], e),
                             port_bf16_vs_fp32=greedy_match(ref32[name], port16[name], e),
                             port_vs_orig_bf16=greedy_match(orig16[name], port16[name], e)))  # fmt: skip
        elif kind == "greedy_logits":
            # the steps on which all three share the fp32 prefix
            seq, e = GREEDY_PAIRS[name], _eos_for(name, eos)
            common = [min(a, b) for a, b in zip(greedy_match(ref32[seq], orig16[seq], e),
                                                greedy_match(ref32[seq], port16[seq], e))]  # fmt: skip

            def err(x, y):
                worst = 0.0
                for row, m in enumerate(common):
                    upto = min(m + 1, x.shape[1], y.shape[1])
                    if upto > 0:
                        worst = max(worst, _scaled_err(x[row, :upto], y[row, :upto])[0])
                return worst

            o, p, x = err(ref32[name], orig16[name]), err(ref32[name], port16[name]), err(orig16[name], port16[name])
            rows.append(dict(quantity=name, kind=kind, ok=p <= BF16_RATIO * o + BF16_FLOOR, steps=sum(common),
                             orig_bf16_vs_fp32=o, port_bf16_vs_fp32=p, port_vs_orig_bf16=x))  # fmt: skip
        elif kind == "ids":
            rows.append(dict(quantity=name, kind=kind, ok=None,
                             orig_bf16_vs_fp32=int((ref32[name] != orig16[name]).sum()),
                             port_bf16_vs_fp32=int((ref32[name] != port16[name]).sum()),
                             port_vs_orig_bf16=int((orig16[name] != port16[name]).sum())))  # fmt: skip
    return rows


def format_rows(rows: list[Row]) -> str:
    return "\n".join(f"  {'ok  ' if r.ok else 'FAIL'} {r.quantity:30s} {r.detail}" for r in rows)


# ---- fixtures --------------------------------------------------------------------------------------------------------


def load_fixture(directory: str | Path = FIXTURE_DIR) -> dict:
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    return {
        "meta": meta,
        "weights": load_file(str(d / "weights_original.safetensors")),
        "inputs": load_file(str(d / "inputs.safetensors")),
        "outputs": load_file(str(d / "outputs.safetensors")),
        "tokenizer_file": d / "tokenizer.json",
    }


def base_tokenizer_from_file(path: str | Path):
    """The GPT-NeoX-style base tokenizer (no OmniMamba tokens), as the original's `AutoTokenizer` returned it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def convert_original(weights: dict, base_tokenizer, conversion: dict, dtype=torch.float32):
    """Original-layout state dict → `OmniMambaForConditionalGeneration` with the project's converter. `conversion`
    holds the sizes that shapes do not determine (caption length, head counts), as recorded by the harness."""
    from omnimamba_hf.conversion.convert_omnimamba_weights_to_hf import (
        build_model,
        cast_state_dict,
        convert_state_dict,
        infer_config_from_state_dict,
        token_ids_from_tokenizer,
    )

    sd = dict(weights)
    config = infer_config_from_state_dict(
        sd,
        token_ids=token_ids_from_tokenizer(base_tokenizer),
        t2i_caption_length=conversion["t2i_caption_length"],
        dino_num_attention_heads=conversion["dino_num_attention_heads"],
        siglip_num_attention_heads=conversion["siglip_num_attention_heads"],
    )
    converted = cast_state_dict(convert_state_dict(sd, config), dtype)
    return build_model(config, converted).to(dtype)
