"""Processor for OmniMamba: tokenizer + image processor + the original's token layouts (ORIGINAL-SPEC §4).

One id space: text ids are `[0, text_vocab_size)`, VQ image code `k` has id `text_vocab_size + k`.

**MMU (`generation_mode="text"`, default), §4.2.** Each sample becomes

    <|mmu|> <|soi|> <image> × num_image_tokens <|eoi|> <|sot|> tokens("USER: {q} ASSISTANT:")

The model scatters the image features into the `<image>` positions. The chat template renders
`<|mmu|><image><|sot|>USER: {q} ASSISTANT:` and `replace_image_token` expands the `<image>`; a text that does not
start with `<|mmu|>` is treated as a raw prompt and wrapped the same way (its `<image>` placeholders moved to the
front, the rest stripped). A sample without an image (text-only chat) gets the same layout, the placeholders filled
with zero features by the model (the original's text-only layout, §4.3 / §8 #8); the output then carries
`image_flags` (bool, one per sample; `pixel_values` rows belong to the samples whose flag is True, in order).
`image_flags` is omitted when every sample has an image. At most one image per sample (the original's layout).
Batches are left-padded with `[PAD]`, `attention_mask` 0 there.

**T2I (`generation_mode="image"`), §4.5.** Each caption becomes the fixed 72-id prompt

    <|t2i|> <|sot|> [PAD] … [PAD] caption[:68] <|eot|> <|soi|>

(the first `t2i_caption_length` caption tokens, right-aligned in `t2i_caption_length` slots pre-filled with `[PAD]`);
`attention_mask` is all ones, as in the original the pads are ordinary, unmasked inputs.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .tokenization_omnimamba import TOKEN_NAMES, build_omnimamba_tokenizer, check_tokenizer_matches_config, special_token_ids

_DEFAULT_CHAT_TEMPLATE = os.path.join(os.path.dirname(__file__), "chat_template.jinja")
_MMU, _SOI, _EOI, _SOT = "<|mmu|>", "<|soi|>", "<|eoi|>", "<|sot|>"


def _default_chat_template() -> str | None:
    if os.path.isfile(_DEFAULT_CHAT_TEMPLATE):
        with open(_DEFAULT_CHAT_TEMPLATE, encoding="utf-8") as f:
            return f.read()
    return None


class OmniMambaProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    generation_mode (`str`, *optional*, defaults to `"text"`): `"text"` builds MMU inputs (image + text → text),
        `"image"` builds the fixed-length T2I prompt (text → image tokens).
    """

    generation_mode: str


class OmniMambaProcessor(ProcessorMixin):
    r"""
    Constructs an OmniMamba processor from an [`OmniMambaImageProcessor`] and a GPT-NeoX tokenizer extended by
    `build_omnimamba_tokenizer`.

    Args:
        image_processor ([`OmniMambaImageProcessor`]): the image processor.
        tokenizer: the OmniMamba tokenizer (`[PAD]`, task tokens and `tokenizer.image_token` present).
        chat_template (`str`, *optional*): defaults to the packaged `chat_template.jinja`; pass
            `prompt_format="train"` to `apply_chat_template` for the original's training prompt `In: {q}\nOut: `.
        num_image_tokens (`int`, *optional*, defaults to 729): `<image>` slots per MMU image.
        text_vocab_size (`int`, *optional*): text embedding rows, the offset of image code 0 in the id space;
            defaults to `len(tokenizer)` rounded up to a multiple of 16 (50288).
        image_vocab_size (`int`, *optional*, defaults to 16384): VQ codebook size.
        t2i_caption_length (`int`, *optional*, defaults to 68): caption slots in the T2I prompt.

    Example:

    ```python
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> prompt
    '<|mmu|><image><|sot|>USER: What is this? ASSISTANT:'
    >>> inputs = processor(images=image, text=prompt)  # input_ids (1, 733 + T), pixel_values (1, 2, 3, 384, 384)
    >>> messages[0]["content"][0]["image"] = image      # the same in one call (what the pipeline does):
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    >>> t2i = processor(text=["a red bicycle"], generation_mode="image")  # input_ids (1, 72)
    ```
    """

    _auto_class = "AutoProcessor"  # save_pretrained copies this code next to the files (trust_remote_code)

    valid_processor_kwargs = OmniMambaProcessorKwargs
    text_kwargs = {"padding": True, "padding_side": "left", "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    generation_mode = "text"

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template=None,
        num_image_tokens: int = 729,
        text_vocab_size: int | None = None,
        image_vocab_size: int = 16384,
        t2i_caption_length: int = 68,
        **kwargs,
    ):
        if getattr(tokenizer, "image_token", None) is None:
            raise ValueError(
                "The tokenizer has no `image_token`: build it with `build_omnimamba_tokenizer(base_tokenizer)`."
            )
        ids = special_token_ids(tokenizer)
        missing = [TOKEN_NAMES[name] for name, value in ids.items() if value is None]
        if missing:
            raise ValueError(f"The tokenizer lacks {missing}: build it with `build_omnimamba_tokenizer`.")
        if text_vocab_size is None:
            text_vocab_size = -(-len(tokenizer) // 16) * 16
        if text_vocab_size < len(tokenizer):
            raise ValueError(f"text_vocab_size={text_vocab_size} is smaller than the tokenizer ({len(tokenizer)} ids).")
        self.num_image_tokens = num_image_tokens
        self.text_vocab_size = text_vocab_size
        self.image_vocab_size = image_vocab_size
        self.t2i_caption_length = t2i_caption_length
        self.image_token = tokenizer.image_token
        self.image_token_id = ids["image_token_id"]
        self.token_ids = ids  # "pad_token_id", "soi_token_id", …, "image_token_id"
        if chat_template is None:
            chat_template = _default_chat_template()
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None, chat_template=None):
        """Build the processor that matches an `OmniMambaConfig`: `tokenizer` is either a plain GPT-NeoX tokenizer
        (extended with `build_omnimamba_tokenizer`, checked against the config's ids) or an already-built one
        (checked); the image processor uses the vision towers' image size and normalisations."""
        if getattr(tokenizer, "image_token", None) is None:
            tokenizer = build_omnimamba_tokenizer(tokenizer, expected_ids=config)
        else:
            check_tokenizer_matches_config(tokenizer, config)
        if image_processor is None:
            from .image_processing_omnimamba import OmniMambaImageProcessor

            image_processor = OmniMambaImageProcessor.from_model_config(config)
        return cls(
            image_processor,
            tokenizer,
            chat_template=chat_template,
            num_image_tokens=config.num_image_tokens,
            text_vocab_size=config.text_vocab_size,
            image_vocab_size=config.image_vocab_size,
            t2i_caption_length=config.t2i_caption_length,
        )

    # ---- __call__ -------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs: Unpack[OmniMambaProcessorKwargs]):
        r"""
        generation_mode (`str`, *optional*, defaults to `"text"`): `"text"` for MMU inputs, `"image"` for the T2I
            prompt (text only).

        Returns:
            [`BatchFeature`] of tensors: `input_ids`, `attention_mask`, and in text mode `pixel_values`
            `(n_images, 2, 3, S, S)` when images are given and `image_flags` `(batch,)` when a sample has no image.
        """
        mode = kwargs.pop("generation_mode", None) or self.generation_mode
        if mode == "image":
            if images is not None:
                raise ValueError("generation_mode='image' (text-to-image) takes captions only, no images.")
            return self._t2i_inputs(text, **kwargs)
        if mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {mode!r}.")
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Bring every MMU sample to `<|mmu|><image><|sot|>…` with exactly one `<image>`, and return one image entry
        per sample (`None` for a text-only sample)."""
        if text is None:  # images only: pixel_values without text
            images = None if images is None else self.image_processor._prepare_images_structure(images)
            return images, None, videos, audio
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings.")
        counts = []
        for i, sample in enumerate(texts):
            if not sample.startswith(_MMU):  # a raw prompt: wrap it, the image placeholder(s) go first
                n = sample.count(self.image_token)
                sample = _MMU + self.image_token * n + _SOT + sample.replace(self.image_token, "").strip()
            counts.append(sample.count(self.image_token))
            if counts[-1] > 1:
                raise ValueError(
                    f"Sample {i} has {counts[-1]} images; OmniMamba takes at most one image per conversation."
                )
            if counts[-1] == 0:  # text-only: same layout, zero image features (§4.3)
                sample = _MMU + self.image_token + sample[len(_MMU) :]
            texts[i] = sample
        per_sample = self._images_per_sample(images, counts)
        return per_sample, texts, videos, audio

    def _images_per_sample(self, images, counts: list[int]) -> list:
        if images is None:
            given = [[] for _ in counts]
        elif isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images):
            given = [list(x) for x in images]  # nested, one list per sample (apply_chat_template)
            if len(given) != len(counts):
                raise ValueError(f"Got image lists for {len(given)} samples but {len(counts)} texts.")
        else:  # flat: in order, to the samples that have a placeholder
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
            if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
                flat = list(images)
            if len(flat) != sum(counts):
                raise ValueError(
                    f"Got {len(flat)} image(s) but the text has {sum(counts)} {self.image_token} placeholder(s) "
                    f"(one per sample with an image). Use apply_chat_template with a {{'type': 'image'}} item."
                )
            it = iter(flat)
            given = [[next(it)] if c else [] for c in counts]
        out = []
        for i, (imgs, c) in enumerate(zip(given, counts)):
            if len(imgs) > 1:
                raise ValueError(f"Sample {i} has {len(imgs)} images; OmniMamba takes at most one per conversation.")
            if len(imgs) != c:
                raise ValueError(
                    f"Sample {i} has an {self.image_token} placeholder but no image was passed."
                    if c
                    else f"An image was passed for sample {i} but its text has no {self.image_token} placeholder."
                )
            out.append(self.image_processor.fetch_images(imgs[0]) if imgs else None)
        return out

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        # `prepare_inputs_layout` has matched images to placeholders already.
        if images is None and text is None:
            raise ValueError(f"You need to provide at least one input to call {self.__class__.__name__}.")

    def _process_images(self, images, **kwargs):
        present = [image for image in images if image is not None]
        data = dict(self.image_processor(present, **kwargs)) if present else {}
        if len(present) < len(images):
            data["image_flags"] = [image is not None for image in images]
        return data, [self.replace_image_token(data, i) for i in range(len(images))]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return _SOI + self.image_token * self.num_image_tokens + _EOI

    def _t2i_inputs(self, text, **kwargs) -> BatchFeature:
        """The fixed-length T2I prompt of §4.5 / ORIGINAL-SPEC §8 #21."""
        if text is None:
            raise ValueError("generation_mode='image' needs captions (`text`).")
        captions = [text] if isinstance(text, str) else list(text)
        merged = self._merge_kwargs(OmniMambaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        slots, ids = self.t2i_caption_length, self.token_ids
        rows = []
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError("Captions must be strings.")
            caption_ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
            if not caption_ids:
                raise ValueError(f"Caption {i} is empty.")
            if len(caption_ids) > slots:
                warnings.warn(
                    f"Caption {i} has {len(caption_ids)} tokens; only the first {slots} are kept (t2i_caption_length).",
                    stacklevel=3,
                )
                caption_ids = caption_ids[:slots]
            padding = [ids["pad_token_id"]] * (slots - len(caption_ids))
            rows.append(
                [ids["t2i_token_id"], ids["sot_token_id"], *padding, *caption_ids, ids["eot_token_id"], ids["soi_token_id"]]
            )
        data = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
        return BatchFeature(data, tensor_type=merged["text_kwargs"].get("return_tensors"))

    # ---- ids and decoding ------------------------------------------------------------------------------------------

    def image_codes_to_ids(self, codes):
        """VQ codes in `[0, image_vocab_size)` → ids in the shared space (`+ text_vocab_size`)."""
        tensor = torch.as_tensor(codes)
        if tensor.numel() and (tensor.min() < 0 or tensor.max() >= self.image_vocab_size):
            raise ValueError(f"Image codes must lie in [0, {self.image_vocab_size}); got {tensor.min()}…{tensor.max()}.")
        out = tensor + self.text_vocab_size
        return out if isinstance(codes, torch.Tensor) else out.tolist()

    def ids_to_image_codes(self, ids):
        """Ids in `[text_vocab_size, text_vocab_size + image_vocab_size)` → VQ codes."""
        tensor = torch.as_tensor(ids)
        low, high = self.text_vocab_size, self.text_vocab_size + self.image_vocab_size
        if tensor.numel() and (tensor.min() < low or tensor.max() >= high):
            raise ValueError(f"Image token ids must lie in [{low}, {high}); got {tensor.min()}…{tensor.max()}.")
        out = tensor - self.text_vocab_size
        return out if isinstance(ids, torch.Tensor) else out.tolist()

    def _clean_ids(self, ids, drop: set[int] = frozenset()) -> list[int]:
        """Text ids only: image ids (≥ text_vocab_size) become the `<image>` placeholder, unused embedding rows
        (`len(tokenizer)` … `text_vocab_size - 1`) and negative ids (e.g. -100 labels) are dropped."""
        size = len(self.tokenizer)
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            i = self.image_token_id if i >= self.text_vocab_size else i
            if 0 <= i < size and i not in drop:
                out.append(i)
        return out

    def _rows(self, ids):
        array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=object)
        if array.ndim == 1 and len(array) and isinstance(array[0], (list, tuple, np.ndarray, torch.Tensor)):
            return [list(row) for row in ids], True  # ragged list of lists
        return (list(array), True) if array.ndim == 2 else ([array], False)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Like the tokenizer's `decode`, but image ids are rendered as `<image>` (dropped with
        `skip_special_tokens=True`) instead of garbage, and out-of-vocabulary/negative ids are dropped."""
        return self.tokenizer.decode(self._clean_ids(token_ids), skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        rows, _ = self._rows(sequences)
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in rows]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids to text. With `skip_special_tokens=True` the task tokens, `[PAD]`, the image
        placeholder, image ids and `<|endoftext|>` are removed. Returns a list for 2-D input, a string for 1-D."""
        drop = {v for v in self.token_ids.values()} if skip_special_tokens else set()
        rows, batched = self._rows(generated_outputs)
        texts = [
            self.tokenizer.decode(self._clean_ids(row, drop), skip_special_tokens=skip_special_tokens, **kwargs)
            for row in rows
        ]
        return texts if batched else texts[0]

    def postprocess(self, images, **kwargs):
        """Forwards to the image processor's `postprocess` (pixels in [-1, 1] → PIL images)."""
        return self.image_processor.postprocess(images, **kwargs)

    def post_process_multimodal_output(self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs):
        """`generation_mode="text"` (default): decoded strings. `"image"`: VQ-decoded pixels `(B, 3, H, W)` in
        [-1, 1] (e.g. `model.decode_image_tokens(codes)`) → list of PIL images."""
        if generation_mode in (None, "text"):
            return self.post_process_image_text_to_text(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        if generation_mode == "image":
            return self.image_processor.postprocess(generated_outputs, return_tensors="PIL.Image.Image")
        raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "image_flags"]


__all__ = ["OmniMambaProcessor", "OmniMambaProcessorKwargs"]
