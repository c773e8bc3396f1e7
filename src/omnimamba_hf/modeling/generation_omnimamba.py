"""Generation for OmniMamba: text (MMU) through transformers' `GenerationMixin`, images (T2I) through a fixed-length
loop in the Janus style (`generate(..., generation_mode="image")`), and the position-table guard for both.

Defaults reproduce the original decoding (ORIGINAL-SPEC §5): greedy for both tasks, MMU stops at `<|endoftext|>`
(id 0), T2I always produces exactly 256 image tokens. Extensions, off by default: sampling options for T2I
(temperature / top-k / top-p, applied to the 16384 image logits) and classifier-free guidance (`guidance_scale > 1`;
not in the original, whose model was never trained with dropped captions).

Position tables. An MMU sequence can hold `mmu_max_position_embeddings` (1500) positions, image slots included; the
token sampled at the last position is never fed back, so at most `1500 + 1 - prompt_length` new tokens exist. The
default generation config asks for exactly that ("as long as the table allows", `max_length = 1501`); an explicit
`max_new_tokens` / `max_length` past it raises a `ValueError` before any work (the original crashed mid-generation,
spec §8 #10). T2I prompts must leave room for the 256 image tokens in the 329-row table.

This file is exported next to the weights for `trust_remote_code=True` (single-dot imports only).
"""

import copy

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput


def omnimamba_generation_config(config) -> GenerationConfig:
    """The original's decoding defaults (spec §5.4, §5.5) as a transformers `GenerationConfig`."""
    return GenerationConfig(
        do_sample=False,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.mmu_max_position_embeddings + 1,
    )


class OmniMambaGenerationMixin(GenerationMixin):
    """`generate()` for both tasks. Mixed into `OmniMambaForConditionalGeneration`."""

    def generate(self, inputs=None, generation_config=None, generation_mode: str = "text", **kwargs):
        r"""
        generation_mode (`str`, defaults to `"text"`): `"text"` for MMU (image + text → text, all of transformers'
            generation features), `"image"` for T2I (prompt ids from `processor(text=..., generation_mode="image")` →
            `(batch, 256)` image-token ids, i.e. `text_vocab_size + code`; see `generate_image_tokens`).
        """
        if generation_mode == "image":
            input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
            return self.generate_image_tokens(input_ids, generation_config=generation_config, **kwargs)
        if generation_mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        if kwargs.get("task", "mmu") != "mmu":
            raise ValueError("Text generation runs the 'mmu' task; for images use generation_mode='image'.")
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            self._check_text_length(input_ids.shape[-1], generation_config, kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def _check_text_length(self, prompt_length: int, generation_config, kwargs) -> None:
        rows = self.config.mmu_max_position_embeddings
        room = rows + 1 - prompt_length
        if room < 1:
            raise ValueError(
                f"The prompt has {prompt_length} positions (image slots included) but the MMU position table has "
                f"{rows}: shorten the prompt."
            )
        gen = generation_config if generation_config is not None else self.generation_config
        max_new = kwargs.get("max_new_tokens", gen.max_new_tokens)
        max_length = kwargs.get("max_length", None if max_new is not None else gen.max_length)
        asked = max_new if max_new is not None else (max_length - prompt_length if max_length is not None else None)
        if asked is not None and asked > room:
            raise ValueError(
                f"Asked for {asked} new tokens after a {prompt_length}-position prompt, but the MMU position table "
                f"({rows} rows, image slots included) leaves room for at most {room}. Pass max_new_tokens <= {room}, "
                "or leave the length unset to generate as long as the table allows."
            )

    # -- T2I ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_image_tokens(
        self,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        guidance_scale: float | None = None,
        streamer=None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        Generate `num_generated_image_tokens` (256) image tokens per prompt (spec §5.1, §5.5).

        input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): T2I prompts (72 ids for the released model).
        generation_config / kwargs: `do_sample` (default False: greedy, as the original), `temperature`, `top_k`,
            `top_p`, `return_dict_in_generate`, `output_scores`, `output_logits`. Logits processors see the image
            *codes* generated so far (so e.g. a repetition penalty indexes the 16384 image logits correctly).
        guidance_scale (`float`, *optional*): classifier-free guidance, an extension not in the original:
            `uncond + scale · (cond − uncond)` with the caption slots replaced by `[PAD]` for the unconditional half.
        attention_mask: accepted for API symmetry; T2I prompts are never padded (their `[PAD]` slots are real inputs).

        Returns `(batch, 256)` image-token ids (`text_vocab_size + code`) or a `GenerateDecoderOnlyOutput`.
        """
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("Image generation needs input_ids of shape (batch, prompt_length) from the processor "
                             "(processor(text=..., generation_mode='image')).")  # fmt: skip
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("T2I prompts are fixed-length and unpadded; got an attention_mask with zeros.")
        batch, prompt_length = input_ids.shape
        n_tokens = config.num_generated_image_tokens
        rows = config.t2i_max_position_embeddings
        if prompt_length + n_tokens - 1 > rows:
            raise ValueError(
                f"A {prompt_length}-token T2I prompt plus {n_tokens} image tokens does not fit the T2I position table "
                f"({rows} rows); the prompt may have at most {rows - n_tokens + 1} tokens "
                f"({config.t2i_prompt_length} for the standard layout)."
            )
        if bool((input_ids >= config.text_vocab_size).any()):
            raise ValueError("T2I prompts hold text ids only.")
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = generation_config.update(**kwargs)
        unused.pop("task", None)
        if unused:
            raise ValueError(f"Unsupported arguments for image generation: {sorted(unused)}.")
        processors = LogitsProcessorList(logits_processor or [])
        if generation_config.do_sample:
            if generation_config.temperature is not None and generation_config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(generation_config.temperature))
            if generation_config.top_k:
                processors.append(TopKLogitsWarper(generation_config.top_k))
            if generation_config.top_p is not None and generation_config.top_p < 1.0:
                processors.append(TopPLogitsWarper(generation_config.top_p))
        cfg = guidance_scale is not None and guidance_scale != 1.0
        if cfg:
            uncond = input_ids.clone()
            uncond[:, 2 : 2 + config.t2i_caption_length] = config.pad_token_id
            prompt = torch.cat([input_ids, uncond])
        else:
            prompt = input_ids

        step = self._t2i_stepper(prompt)
        codes = input_ids.new_zeros(batch, n_tokens)
        scores, raw = [], []
        logits = step(None, None)
        for k in range(n_tokens):
            if cfg:
                cond, unc = logits.float().chunk(2)
                logits = unc + guidance_scale * (cond - unc)
            next_scores = processors(codes[:, :k], logits.float())
            if generation_config.output_logits:
                raw.append(logits)
            if generation_config.output_scores:
                scores.append(next_scores)
            if generation_config.do_sample:
                code = torch.multinomial(next_scores.softmax(-1), 1)[:, 0]
            else:
                code = next_scores.argmax(-1)
            codes[:, k] = code
            if streamer is not None:
                streamer.put((code + config.text_vocab_size).cpu())
            if k + 1 < n_tokens:
                fed = torch.cat([code, code]) if cfg else code
                logits = step(fed + config.text_vocab_size, prompt_length + k)
        if streamer is not None:
            streamer.end()
        sequences = codes + config.text_vocab_size
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=sequences,
                scores=tuple(scores) if scores else None,
                logits=tuple(raw) if raw else None,
            )
        return sequences

    def _t2i_stepper(self, prompt: torch.LongTensor):
        """Eager stepping: `step(None, None)` runs the prefill and returns the last logits; `step(ids, position)`
        feeds one image token per row at `position` (the original's decode step, spec §3.6)."""
        cache = DynamicCache(config=self.config.get_text_config(decoder=True))

        def step(ids, position):
            if ids is None:
                out = self(input_ids=prompt, task="t2i", cache_params=cache, use_cache=True, logits_to_keep=1)
            else:
                positions = torch.full((ids.shape[0], 1), position, device=ids.device, dtype=torch.long)
                out = self(input_ids=ids[:, None], task="t2i", cache_params=cache, position_ids=positions)
            return out.logits[:, -1]

        return step

    @torch.no_grad()
    def decode_image_tokens(self, image_ids: torch.LongTensor) -> torch.Tensor:
        """`(batch, 256)` image-token ids (`text_vocab_size + code`) → `(batch, 3, 256, 256)` pixels, nominally in
        [-1, 1] and not clamped (the original's `decode_to_img`, spec §5.5). `processor.postprocess` makes PIL images."""
        V, n_codes = self.config.text_vocab_size, self.config.image_vocab_size
        if bool(((image_ids < V) | (image_ids >= V + n_codes)).any()):
            raise ValueError(
                f"decode_image_tokens takes image-token ids in [{V}, {V + n_codes}) (text_vocab_size + code), as "
                "generate(..., generation_mode='image') returns them."
            )
        return self.model.vqmodel.decode_codes(image_ids - V)


__all__ = ["OmniMambaGenerationMixin", "omnimamba_generation_config"]
