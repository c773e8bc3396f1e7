"""Generation for OmniMamba: text (MMU) through transformers' `GenerationMixin`, images (T2I) through a fixed-length
loop in the Janus style (`generate(..., generation_mode="image")`), and the position-table guard for both.

Defaults reproduce the original decoding (ORIGINAL-SPEC §5): greedy for both tasks, MMU stops at `<|endoftext|>`
(id 0), T2I always produces exactly 256 image tokens. Extensions, off by default: sampling options for T2I
(temperature / top-k / top-p, applied to the 16384 image logits) and classifier-free guidance (`guidance_scale > 1`;
not in the original, whose model was never trained with dropped captions).

Decoders (`generate(..., decoder=...)`): "eager" runs every step through `forward` with a transformers `DynamicCache`;
"cuda_graph" (the default on CUDA in eval mode: "auto") replays one compiled CUDA graph per step over static state
buffers (`graph_decode_omnimamba.py`); "static" is the same static-buffer step without compilation or graph (any device;
what the CPU tests use to check the fast path's arithmetic). With "cuda_graph" the prefill is replayed from CUDA
graphs too (`graph_prefill_omnimamba.py`: vision towers, and the Mamba stack in power-of-two chunks); otherwise eager.
On the static decoders, greedy and plain sampled decoding (temperature / top-k / top-p, guidance) choose every token
inside the decoder (`OmniMambaGraphDecoder.decode`: the choice, eos and padding, the fed-back id and position; on CUDA
one graph replay per 8 steps, no host work in between); returning scores or logits, a repetition penalty, user
logits processors and streaming take the host loop over the one-step graph. Both give the same tokens, except that
on CUDA temperature / top-k sampling without guidance chooses with one Triton launch per step (three for top-k at the
MMU head's width; `FusedChoice`), whose
draws follow the same distribution with other random numbers (`USE_FUSED_CHOICE = False`: the PyTorch choice).

Position tables. An MMU sequence can hold `mmu_max_position_embeddings` (1500) positions, image slots included; the
token sampled at the last position is never fed back, so at most `1500 + 1 - prompt_length` new tokens exist. The
default (no `max_new_tokens` / `max_length` anywhere) is exactly that: "as long as the table allows"; an explicit
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
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .graph_decode_omnimamba import FusedChoice, OmniMambaGraphDecoder
from .graph_prefill_omnimamba import OmniMambaGraphPrefill, OmniMambaGraphVision
from .mixer_omnimamba import ssm_state_dtype
from .triton_choice_omnimamba import fused_choice_supported

# model.__dict__ entries that hold captured graphs and static buffers: dropped by reset_graph_decoders() and never
# pickled / deep-copied with the model.
_GRAPH_CACHES = (
    "_omnimamba_graph_decoders", "_omnimamba_graph_prefill", "_omnimamba_fused_in_proj", "_omnimamba_ssm_decay_rates",
    "_omnimamba_image_code_table",
)  # fmt: skip

logger = logging.get_logger(__name__)

DECODERS = ("auto", "eager", "static", "cuda_graph")
# generate() arguments that are model inputs or loop helpers (not GenerationConfig fields) which the lean static/graph
# text loop implements; any other argument goes through GenerationMixin.
_STATIC_TEXT_INPUTS = {
    "input_ids", "attention_mask", "pixel_values", "image_flags", "streamer", "logits_processor", "task", "use_cache",
}  # fmt: skip
# GenerationConfig fields both decode loops implement: the choice, the special ids, what they return.
_COMMON_FIELDS = {
    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id",
    "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
}  # fmt: skip
_CONFIG_METADATA = {"transformers_version", "_from_model_config"}  # in every saved config's diff; not options
# The static/graph text loop's fields (an allow-list: a field set to anything else, e.g. num_return_sequences, min_p
# or suppress_tokens, sends the call through GenerationMixin, which implements it).
_STATIC_TEXT_FIELDS = _COMMON_FIELDS | _CONFIG_METADATA | {"max_new_tokens", "max_length"}
# What image generation implements (it always makes `num_generated_image_tokens` tokens; eos / pad / bos and the MMU
# length settings of the model's own generation config do not apply to it).
_IMAGE_FIELDS = _COMMON_FIELDS | _CONFIG_METADATA | {"num_return_sequences"}


def omnimamba_generation_config(config) -> GenerationConfig:
    """The original's decoding defaults (spec §5.4, §5.5) as a transformers `GenerationConfig`."""
    return GenerationConfig(
        do_sample=False,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _plain(generation_config, kwargs) -> bool:
    """True when the call (its config and kwargs) asks for nothing beyond what the static text loop implements: every
    config field that differs from transformers' defaults is in the allow-list, and no kwarg is unknown."""
    g = copy.deepcopy(generation_config)
    unknown = g.update(**{k: v for k, v in kwargs.items() if k not in _STATIC_TEXT_INPUTS})
    fields = set(g.to_diff_dict()) | set(unknown)
    # num_beams / num_return_sequences == 1 are the defaults written out (e.g. by the pipeline)
    fields -= {name for name in ("num_beams", "num_return_sequences") if (getattr(g, name) or 1) == 1}
    return fields <= _STATIC_TEXT_FIELDS


# Logits warpers that ignore the tokens so far and run without host syncs: a decode that needs only these (greedy,
# or sampling with temperature / top-k / top-p) chooses its tokens inside the decoder's graphs.
_IN_GRAPH_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


# On CUDA, greedy and temperature / top-k sampling choose in one Triton launch per step (FusedChoice) instead of
# PyTorch ops: ~10 µs less per greedy token, ~140 µs less per top-k-sampled T2I token and ~125 µs per MMU one (three
# launches at that width) on an H100 (docs/BENCHMARKS.md).
# Sampling then draws other random numbers than the host loop (same distribution); False keeps the PyTorch choice.
USE_FUSED_CHOICE = True


def _in_graph_choice(generation_config, processors, decoder: OmniMambaGraphDecoder, guidance_scale=None):
    """`(choose, decode_choice, key)`: the host loop's choice of the next token as one capturable function (guidance
    mix, warpers, argmax or multinomial; it also makes the choice from the prefill's logits), what `decoder.decode`
    chooses with (that function, or a `FusedChoice`) and the hashable name `decode` needs for a function — or None
    when the decode needs the host loop (scores or logits returned, a repetition penalty, user logits processors)."""
    g = generation_config
    if g.output_logits or g.output_scores or not all(type(p) in _IN_GRAPH_WARPERS for p in processors):
        return None

    def choose(logits):
        if guidance_scale is not None:
            cond, unc = logits.float().chunk(2)
            logits = unc + guidance_scale * (cond - unc)
        return _choose_next(g, processors, None, logits)[0]  # the warpers ignore the tokens so far

    top_k = int(g.top_k or 0) if g.do_sample else 0  # as `_logits_processors` builds the warpers
    if (
        USE_FUSED_CHOICE and guidance_scale is None and decoder.logits.device.type == "cuda"
        and not any(isinstance(p, TopPLogitsWarper) for p in processors)
        and fused_choice_supported(decoder.logits.shape[1], g.do_sample, top_k)
    ):  # fmt: skip
        temperature = float(g.temperature) if g.do_sample and g.temperature is not None else 1.0
        return choose, FusedChoice(bool(g.do_sample), temperature, top_k), None
    key = ("sample", g.temperature, g.top_k, g.top_p) if g.do_sample else ("argmax",)
    return choose, choose, key + (guidance_scale,)


def _choose_next(generation_config, processors, input_ids, logits):
    """`(next token, scores)` as transformers' decoding loop chooses it: the processors on float32 scores, then
    multinomial sampling or argmax."""
    scores = processors(input_ids, logits.float())
    if generation_config.do_sample:
        return torch.multinomial(scores.softmax(-1), 1)[:, 0], scores
    return scores.argmax(-1), scores


class OmniMambaGenerationMixin(GenerationMixin):
    """`generate()` for both tasks. Mixed into `OmniMambaForConditionalGeneration`."""

    def generate(self, inputs=None, generation_config=None, generation_mode: str = "text", decoder: str = "auto", **kwargs):
        r"""
        generation_mode (`str`, defaults to `"text"`): `"text"` for MMU (image + text → text, all of transformers'
            generation features), `"image"` for T2I (prompt ids from `processor(text=..., generation_mode="image")` →
            `(batch, 256)` image-token ids, i.e. `text_vocab_size + code`; see `generate_image_tokens`).
        decoder (`str`, defaults to `"auto"`): "auto", "eager", "static" or "cuda_graph" (see the module docstring).
            Text generation uses the static/graph loop for greedy or sampled decoding (temperature, top-k, top-p,
            repetition penalty, eos, streaming, scores); other features (beam search, …) run through GenerationMixin.
        """
        decoder = self._resolve_decoder(decoder)
        if generation_mode == "image":
            input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
            return self.generate_image_tokens(input_ids, generation_config=generation_config, decoder=decoder, **kwargs)
        if generation_mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        if kwargs.get("task", "mmu") != "mmu":
            raise ValueError("Text generation runs the 'mmu' task; for images use generation_mode='image'.")
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1]:
            pad = self.config.pad_token_id
            first = input_ids.gather(1, (input_ids != pad).int().argmax(1, keepdim=True)) if pad is not None else input_ids[:, :1]
            if bool((first == self.config.t2i_token_id).any()):
                raise ValueError("This is a T2I prompt (it starts with <|t2i|>): generate images with generation_mode='image'.")
        if input_ids is not None:
            generation_config = self._check_text_length(input_ids.shape[-1], generation_config, kwargs)
            gen = generation_config if generation_config is not None else self.generation_config
            if decoder != "eager" and kwargs.get("use_cache", True) and _plain(gen, kwargs):
                kwargs.pop("input_ids", None)
                return self._generate_text_static(input_ids, generation_config, decoder, **kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def _resolve_decoder(self, decoder: str) -> str:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
        on_cuda = self.device.type == "cuda"
        if decoder == "auto":
            return "cuda_graph" if on_cuda and not self.training else "eager"
        if decoder == "cuda_graph" and not on_cuda:
            raise ValueError("decoder='cuda_graph' needs the model on a CUDA device; use 'static' or 'eager'.")
        return decoder

    def graph_decoder(
        self, task: str, batch_size: int, decoder: str = "cuda_graph", backend: str = "auto"
    ) -> OmniMambaGraphDecoder:
        """The cached static-state decoder for (task, batch size, dtype, state dtype, device); built on first use.
        `backend`: "fused" (this package's Triton step), "kernels" (mamba-ssm / causal-conv1d kernels + cuBLAS),
        "hybrid" (the kernels backend with this package's conv + SSM kernel), "inductor" (torch.compile) or "auto"
        (fused where Triton runs up to batch 3, or 16 in bfloat16; beyond, hybrid with a bf16 SSM state, else
        kernels when installed, else inductor)."""
        key = (task, batch_size, self.dtype, ssm_state_dtype(self.config, self.dtype), self.device, decoder, backend)
        decoders = self.__dict__.setdefault("_omnimamba_graph_decoders", {})
        if key not in decoders:
            graph = decoder == "cuda_graph"
            decoders[key] = OmniMambaGraphDecoder(
                self, task, batch_size, compile=graph, use_graph=graph, backend=backend if graph else "inductor"
            )
        return decoders[key]

    def reset_graph_decoders(self) -> None:
        """Drop captured decoders and prefill graphs (needed after replacing parameter tensors, e.g.
        `load_state_dict(assign=True)`)."""
        for key in _GRAPH_CACHES[:2]:
            for captured in self.__dict__.pop(key, {}).values():
                if captured is not None:
                    captured.release()  # now, not when the garbage collector reaches the model <-> graph cycle

    def graph_prefill(self, task: str, batch_size: int) -> OmniMambaGraphPrefill:
        """The cached CUDA-graph prefill for (task, batch size, dtype, state dtype, device); graphs are captured on
        first use."""
        key = (task, batch_size, self.dtype, ssm_state_dtype(self.config, self.dtype), self.device)
        cache = self.__dict__.setdefault("_omnimamba_graph_prefill", {})
        if key not in cache:
            cache[key] = OmniMambaGraphPrefill(self, task, batch_size)
        return cache[key]

    def _graph_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`get_image_features` replayed from a CUDA graph per number of images (eager if the towers cannot be
        captured, e.g. with an attention implementation that syncs with the host; a warning says so once)."""
        key = ("vision", pixel_values.shape[0], self.dtype, self.device)
        cache = self.__dict__.setdefault("_omnimamba_graph_prefill", {})
        if key not in cache:
            try:
                cache[key] = OmniMambaGraphVision(self, pixel_values.shape[0])
            except Exception as error:  # noqa: BLE001 (any capture failure: fall back, do not fail generation)
                logger.warning(f"The vision towers could not be captured in a CUDA graph ({error!r}); running eagerly.")
                cache[key] = None
        if cache[key] is None:
            return self.model.get_image_features(pixel_values)
        return cache[key](pixel_values)

    def _omnimamba_prefill(
        self, input_ids, task, decoder, pixel_values=None, image_flags=None, attention_mask=None, position_ids=None
    ):
        """The prompt pass: `(last-position logits, DynamicCache with the final states)`. On "cuda_graph" the
        embeddings run eagerly (with the input checks) and the vision towers + Mamba stack replay CUDA graphs."""
        if decoder != "cuda_graph":
            cache = DynamicCache(config=self.config.get_text_config(decoder=True))
            out = self(
                input_ids=input_ids, pixel_values=pixel_values, image_flags=image_flags, attention_mask=attention_mask,
                position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1, task=task,
            )  # fmt: skip
            return out.logits[:, -1], cache
        features = None
        if pixel_values is not None and pixel_values.shape[0]:
            features = self._graph_image_features(pixel_values)
        embeds, _ = self.model.build_inputs_embeds(
            input_ids, pixel_values, image_flags, position_ids, task, image_features=features
        )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        prefill = self.graph_prefill(task, input_ids.shape[0])
        return prefill(embeds, attention_mask), prefill.cache

    def _logits_processors(self, generation_config, logits_processor=None) -> LogitsProcessorList:
        processors = LogitsProcessorList(logits_processor or [])
        if generation_config.repetition_penalty is not None and generation_config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(generation_config.repetition_penalty))
        if generation_config.do_sample:
            if generation_config.temperature is not None and generation_config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(generation_config.temperature))
            if generation_config.top_k:
                processors.append(TopKLogitsWarper(generation_config.top_k))
            if generation_config.top_p is not None and generation_config.top_p < 1.0:
                processors.append(TopPLogitsWarper(generation_config.top_p))
        return processors

    @torch.no_grad()
    def _generate_text_static(
        self, input_ids, generation_config, decoder, attention_mask=None, pixel_values=None, image_flags=None,
        logits_processor=None, streamer=None, **kwargs,
    ):  # fmt: skip
        """The MMU decode loop over the static/graph decoder (same results as GenerationMixin for the features it
        implements: greedy/sampling, processors, eos with finished rows padded, max length, streaming, scores)."""
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs.pop("task", None)
        kwargs.pop("use_cache", None)
        generation_config.update(**kwargs)
        batch, prompt_length = input_ids.shape
        if generation_config.max_new_tokens is not None:
            max_new = generation_config.max_new_tokens
        else:
            max_new = generation_config.max_length - prompt_length
        eos = generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else (eos[0] if eos else 0)
        processors = self._logits_processors(generation_config, logits_processor)
        if attention_mask is None:  # inferred from the padding as GenerationMixin does (pad ids that are not eos)
            pad_id = generation_config.pad_token_id
            if pad_id is not None and pad_id not in eos and bool((input_ids == pad_id).any()):
                attention_mask = (input_ids != pad_id).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._omnimamba_prefill(
            input_ids, "mmu", decoder, pixel_values, image_flags, attention_mask=attention_mask, position_ids=position_ids
        )
        static = self.graph_decoder("mmu", batch, decoder) if max_new > 1 else None
        if static is not None:
            static.load_state(cache)
        del cache
        if streamer is not None:
            streamer.put(input_ids.cpu())
        sequences = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        scores, raw = [], []
        next_position = position_ids[:, -1] + 1
        check_every = 1 if streamer is not None or self.device.type != "cuda" else 8  # fewer host syncs on GPU
        in_graph = None if streamer is not None or static is None else _in_graph_choice(
            generation_config, processors, static
        )
        if in_graph is not None:  # the default (greedy) and plain sampling: every choice made inside the graph
            choose, decode_choice, key = in_graph
            token = choose(logits)
            rest = static.decode(token, next_position, max_new - 1, decode_choice, key, eos=eos, pad=pad)
            sequences = torch.cat([sequences, token[:, None], rest], dim=-1)
        else:
            for k in range(max_new):
                token, next_scores = _choose_next(generation_config, processors, sequences, logits)
                if generation_config.output_logits:
                    raw.append(logits.clone())
                if generation_config.output_scores:
                    scores.append(next_scores)
                token = torch.where(unfinished, token, pad)
                sequences = torch.cat([sequences, token[:, None]], dim=-1)
                if streamer is not None:
                    streamer.put(token.cpu())
                for e in eos:
                    unfinished &= token != e
                if k + 1 == max_new or ((k + 1) % check_every == 0 and not bool(unfinished.any())):
                    break
                logits = static.step(token, next_position + k)
        if eos and (check_every > 1 or in_graph is not None):  # trim the steps taken after every row had finished
            finished_at = (sequences[:, prompt_length:][..., None] == torch.tensor(eos, device=sequences.device)).any(-1)
            done = finished_at.long().cumsum(-1).clamp(max=1).min(0).values  # 1 from the step all rows are done
            if bool(done.any()):
                last = int(done.nonzero()[0]) + 1
                sequences = sequences[:, : prompt_length + last]
                scores, raw = scores[:last], raw[:last]
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=sequences, scores=tuple(scores) or None, logits=tuple(raw) or None
            )
        return sequences

    def _check_text_length(self, prompt_length: int, generation_config, kwargs):
        """Refuse lengths past the MMU position table before any work; with no length set, generate as long as the
        table allows. Returns the generation config to use (a copy when it sets the length itself)."""
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
        if max_new is None and max_length is None:  # as long as the position table allows
            if generation_config is None:
                kwargs["max_new_tokens"] = room
                return None
            generation_config = copy.deepcopy(generation_config)  # not a kwarg beside a config (deprecated in 5.x)
            generation_config.max_new_tokens = room
            return generation_config
        asked = max_new if max_new is not None else max_length - prompt_length
        if asked < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for new tokens after the {prompt_length}-position prompt: "
                "set max_new_tokens (the number of tokens to generate) instead."
            )
        if asked > room:
            raise ValueError(
                f"Asked for {asked} new tokens after a {prompt_length}-position prompt, but the MMU position table "
                f"({rows} rows, image slots included) leaves room for at most {room}. Pass max_new_tokens <= {room} "
                "(pipeline('image-text-to-text') asks for 256 unless given max_new_tokens), or leave the length unset "
                "in a direct generate() call to generate as long as the table allows."
            )
        return generation_config

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
        decoder: str = "auto",
        **kwargs,
    ):
        r"""
        Generate `num_generated_image_tokens` (256) image tokens per prompt (spec §5.1, §5.5).

        input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): T2I prompts (72 ids for the released model).
        generation_config / kwargs: `do_sample` (default False: greedy, as the original), `temperature`, `top_k`,
            `top_p`, `repetition_penalty`, `num_return_sequences` (with sampling: that many images per prompt, in
            prompt order), `return_dict_in_generate`, `output_scores`, `output_logits`, and lengths that admit the
            image's 256 tokens; anything else (beams, a shorter length, …) raises. Logits processors see the image *codes* generated so far (so e.g. a
            repetition penalty indexes the 16384 image logits correctly).
        guidance_scale (`float`, *optional*): classifier-free guidance, an extension not in the original:
            `uncond + scale · (cond − uncond)` with the caption slots replaced by `[PAD]` for the unconditional half.
        attention_mask: accepted for API symmetry; T2I prompts are never padded (their `[PAD]` slots are real inputs).
        decoder (`str`): "auto", "eager", "static" or "cuda_graph" (module docstring).

        Returns `(batch, 256)` image-token ids (`text_vocab_size + code`) or a `GenerateDecoderOnlyOutput`.
        """
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("Image generation needs input_ids of shape (batch, prompt_length) from the processor "
                             "(processor(text=..., generation_mode='image')).")  # fmt: skip
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("T2I prompts are fixed-length and unpadded; got an attention_mask with zeros.")
        if bool((input_ids[:, 0] == config.mmu_token_id).any()):  # the other task's layout (any other ids may be T2I)
            raise ValueError(
                f"This is an MMU prompt (it starts with <|mmu|>); T2I prompts start with <|t2i|> ({config.t2i_token_id}) "
                "and end with <|soi|>. Build them with processor(text=..., generation_mode='image') "
                "(pipeline('any-to-any'): processor_kwargs={'generation_mode': 'image'})."
            )
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
        kwargs.pop("task", None)
        asked = set(kwargs) | (set(generation_config.to_diff_dict()) if generation_config is not None else set())
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = generation_config.update(**kwargs)
        if unused:
            raise ValueError(f"Unsupported arguments for image generation: {sorted(unused)}.")
        g = generation_config
        unsupported = {
            name for name in asked - _IMAGE_FIELDS
            if not (name == "num_beams" and (g.num_beams or 1) == 1)
            # a length is a maximum: one that admits all the image's tokens is met (pipelines pass 256 by default)
            and not (name == "max_new_tokens" and g.max_new_tokens >= n_tokens)
            and not (name == "max_length" and g.max_length >= prompt_length + n_tokens)
        }  # fmt: skip
        if unsupported:
            raise ValueError(
                f"Image generation does not support {sorted(unsupported)}: it always makes {n_tokens} image tokens per "
                f"prompt and implements {sorted(_IMAGE_FIELDS - _CONFIG_METADATA)}."
            )
        copies = g.num_return_sequences or 1
        if copies > 1:
            if not g.do_sample:
                raise ValueError(
                    f"num_return_sequences={copies} needs do_sample=True (greedy decoding gives the same image each time)."
                )
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            batch = input_ids.shape[0]
        processors = self._logits_processors(generation_config, logits_processor)
        decoder = self._resolve_decoder(decoder)
        cfg = guidance_scale is not None and guidance_scale != 1.0
        if cfg:
            uncond = input_ids.clone()
            uncond[:, 2 : 2 + config.t2i_caption_length] = config.pad_token_id
            prompt = torch.cat([input_ids, uncond])
        else:
            prompt = input_ids

        step = self._t2i_stepper(prompt, decoder)
        codes = input_ids.new_zeros(batch, n_tokens)
        scores, raw = [], []
        logits = step(None, None)
        in_graph = None if streamer is not None or step.static is None else _in_graph_choice(
            generation_config, processors, step.static, guidance_scale if cfg else None
        )
        if in_graph is not None:  # the default (greedy) and plain sampling: every choice made inside the graph
            choose, decode_choice, key = in_graph
            codes[:, 0] = choose(logits)
            vocab = config.text_vocab_size
            codes[:, 1:] = step.static.decode(codes[:, 0], prompt_length, n_tokens - 1, decode_choice, key, offset=vocab)
        else:
            for k in range(n_tokens):
                if cfg:
                    cond, unc = logits.float().chunk(2)
                    logits = unc + guidance_scale * (cond - unc)
                code, next_scores = _choose_next(generation_config, processors, codes[:, :k], logits)
                if generation_config.output_logits:
                    raw.append(logits.clone())
                if generation_config.output_scores:
                    scores.append(next_scores)
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

    def _t2i_stepper(self, prompt: torch.LongTensor, decoder: str = "eager"):
        """`step(None, None)` runs the (eager) prefill and returns the last logits; `step(ids, position)` feeds one
        image token per row at `position` (the original's decode step, spec §3.6), eagerly or on the static decoder."""
        cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        static = None if decoder == "eager" else self.graph_decoder("t2i", prompt.shape[0], decoder)

        def step(ids, position):
            if ids is None:
                if decoder == "cuda_graph":
                    logits, graph_cache = self._omnimamba_prefill(prompt, "t2i", decoder)
                    static.load_state(graph_cache)
                    return logits
                out = self(input_ids=prompt, task="t2i", cache=cache, use_cache=True, logits_to_keep=1)
                if static is not None:
                    static.load_state(cache)
            elif static is not None:
                return static.step(ids, position)
            else:
                positions = torch.full((ids.shape[0], 1), position, device=ids.device, dtype=torch.long)
                out = self(input_ids=ids[:, None], task="t2i", cache=cache, position_ids=positions)
            return out.logits[:, -1]

        step.static = static
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
