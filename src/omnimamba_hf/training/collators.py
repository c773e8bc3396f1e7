"""Training sequences and collators for OmniMamba (ORIGINAL-SPEC §4.3, §4.4, §4.6, §7.4).

The sequences are built exactly as the original builds them (ids in the shared id space of
`OmniMambaForConditionalGeneration`: text ids `< text_vocab_size`, VQ code k = `text_vocab_size + k`):

**MMU** (`build_mmu_example`): `<|mmu|> <|soi|>` + `num_image_tokens` × `<image>` + `<|eoi|> <|sot|>` + a text part of
exactly `max_text_length` (449) ids; labels -100 for the first `4 + num_image_tokens` positions, then the text labels.
The model scatters the projected image features into the `<image>` slots (zeros for a text-only sample, §8 #8).

* `finetune` text (`build_finetune_text`, the original `FinetuneDataset` + `MambaPromptBuilder`): every turn is
  tokenised separately — human `"In: {msg}\\nOut: "` (a leading `"\\n"` from the second human turn on), gpt
  `"{msg or ' '}<|endoftext|>"`, `<image>` removed and messages stripped; turns are appended while the ids stay
  `≤ max_text_length - 1`, the first that does not fit ends the conversation; labels are -100 on human turns and the ids
  on gpt turns; then `<|eot|>` with label -100; right-padded with `[PAD]` / -100.
* `align` text (`build_align_text`, the original `AlignDataset`): `caption.strip() + "<|endoftext|>"` (the last turn),
  tokenised in one piece, cut to `max_text_length`, labels = ids; right-padded with `[PAD]` / -100.

**T2I** (`build_t2i_example`): `<|t2i|> <|sot|>` + `t2i_caption_length` (68) caption slots (the first 68 caption
tokens, right-aligned after `[PAD]`s) + `<|eot|> <|soi|>` + the image's codes + `<|eoi|>` (329 ids); labels -100
except the codes. (The model applies `caption_mlp` to every text-side id of a T2I row, `<|eoi|>` included, §8 #5.)

Both collators return model keyword arguments; `OmniMambaDataCollator` groups a mixed list of records by task and
returns `{"mmu": {...}, "t2i": {...}}` (only the tasks present), which `OmniMambaTrainer` runs as two forwards.
No `attention_mask` is produced: as in the original, the right padding of MMU texts is an ordinary input after the
supervised tokens (a causal model never looks ahead) and T2I pads are real, unmasked prompt inputs (§4.4).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ENDOFTEXT = "<|endoftext|>"
TASKS = ("mmu", "t2i")
MMU_FORMATS = ("finetune", "align")


class BadRecordError(ValueError):
    """A training record that cannot be turned into a training sequence (missing image, empty conversation, no
    supervised token within the length budget, malformed fields). Carries a short machine-readable `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ---- token ids --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceSpec:
    """Everything a training layout depends on; `from_config(OmniMambaConfig)`. Lengths default to the released
    model's (449 text ids, 68 caption slots, 729 image slots, 256 codes) and are configurable for tiny tests."""

    pad_token_id: int
    soi_token_id: int
    eoi_token_id: int
    sot_token_id: int
    eot_token_id: int
    t2i_token_id: int
    mmu_token_id: int
    image_token_id: int
    text_vocab_size: int
    image_vocab_size: int
    num_image_tokens: int = 729
    t2i_caption_length: int = 68
    num_image_codes: int = 256
    max_text_length: int = 449
    mmu_max_positions: int | None = None
    t2i_max_positions: int | None = None

    @classmethod
    def from_config(cls, config, max_text_length: int = 449) -> SequenceSpec:
        return cls(
            pad_token_id=config.pad_token_id,
            soi_token_id=config.soi_token_id,
            eoi_token_id=config.eoi_token_id,
            sot_token_id=config.sot_token_id,
            eot_token_id=config.eot_token_id,
            t2i_token_id=config.t2i_token_id,
            mmu_token_id=config.mmu_token_id,
            image_token_id=config.image_token_id,
            text_vocab_size=config.text_vocab_size,
            image_vocab_size=config.image_vocab_size,
            num_image_tokens=config.num_image_tokens,
            t2i_caption_length=config.t2i_caption_length,
            num_image_codes=config.num_generated_image_tokens,
            max_text_length=max_text_length,
            mmu_max_positions=config.mmu_max_position_embeddings,
            t2i_max_positions=config.t2i_max_position_embeddings,
        )

    def check_mmu(self) -> None:
        """Raise when the MMU training layout does not fit the MMU position table."""
        mmu_len = 4 + self.num_image_tokens + self.max_text_length
        if self.mmu_max_positions is not None and mmu_len > self.mmu_max_positions:
            raise ValueError(
                f"MMU training sequences are 4 + {self.num_image_tokens} + max_text_length={self.max_text_length} = "
                f"{mmu_len} long, past the {self.mmu_max_positions}-row MMU position table: lower max_text_length."
            )

    def check_t2i(self) -> None:
        """Raise when the T2I training layout does not fit the T2I position table."""
        t2i_len = self.t2i_caption_length + 5 + self.num_image_codes
        if self.t2i_max_positions is not None and t2i_len > self.t2i_max_positions:
            raise ValueError(f"T2I training sequences ({t2i_len}) exceed the T2I position table ({self.t2i_max_positions}).")

    @property
    def mmu_length(self) -> int:
        return 4 + self.num_image_tokens + self.max_text_length

    @property
    def t2i_length(self) -> int:
        return self.t2i_caption_length + 5 + self.num_image_codes


# ---- MMU text parts -------------------------------------------------------------------------------------------------

_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "model"}


def _turn_text(turn) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise BadRecordError("malformed conversation", f"a turn is {type(turn).__name__}, not a dict")
    role = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    if not isinstance(value, str):
        raise BadRecordError("malformed conversation", "a turn has no string 'value'")
    return str(role).lower(), value


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_right(ids: list[int], labels: list[int], length: int, pad_id: int) -> tuple[list[int], list[int]]:
    ids, labels = ids[:length], labels[:length]
    n = length - len(ids)
    return ids + [pad_id] * n, labels + [IGNORE_INDEX] * n


def build_finetune_text(conversations: Sequence, tokenizer, spec: SequenceSpec) -> tuple[list[int], list[int]]:
    """The fine-tuning text part (`max_text_length` ids and labels) of a LLaVA-style conversation; see the module
    docstring. Raises `BadRecordError` for an empty or malformed conversation and for one whose first answer does not
    fit (no supervised token), which the original would train on as an all-ignored sample."""
    if not conversations:
        raise BadRecordError("empty conversation")
    ids: list[int] = []
    labels: list[int] = []
    budget = spec.max_text_length - 1  # room for the closing <|eot|>
    for k, turn in enumerate(conversations):
        role, value = _turn_text(turn)
        expected = _HUMAN if k % 2 == 0 else _GPT
        if role not in expected:
            raise BadRecordError("malformed conversation", f"turn {k} is from {role!r}; turns must alternate human/gpt")
        message = value.replace("<image>", "").strip()
        if k % 2 == 0:
            text = ("\n" if k else "") + f"In: {message}\nOut: "
        else:
            text = (message if message != "" else " ") + ENDOFTEXT
        turn_ids = _encode(tokenizer, text)
        if len(ids) + len(turn_ids) > budget:
            break
        ids += turn_ids
        labels += turn_ids if k % 2 else [IGNORE_INDEX] * len(turn_ids)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecordError(
            "no supervised token",
            f"no answer fits in max_text_length={spec.max_text_length} (over-long first turn) or the conversation has no answer",
        )
    ids.append(spec.eot_token_id)
    labels.append(IGNORE_INDEX)
    return _pad_right(ids, labels, spec.max_text_length, spec.pad_token_id)


def build_align_text(conversations: Sequence, tokenizer, spec: SequenceSpec) -> tuple[list[int], list[int]]:
    """The alignment text part: the caption (last turn) + `<|endoftext|>`, all supervised, cut to `max_text_length`."""
    if not conversations:
        raise BadRecordError("empty conversation")
    if len(conversations) != 2:
        raise BadRecordError("malformed conversation", f"alignment records have 2 turns, got {len(conversations)}")
    _, caption = _turn_text(conversations[-1])
    if "<image>" in caption:
        raise BadRecordError("malformed conversation", "the caption turn contains <image>")
    if not caption.strip():
        raise BadRecordError("empty conversation", "empty caption")
    ids = _encode(tokenizer, caption.strip() + ENDOFTEXT)[: spec.max_text_length]
    return _pad_right(ids, list(ids), spec.max_text_length, spec.pad_token_id)


def build_mmu_text(record: Mapping, tokenizer, spec: SequenceSpec, mmu_format: str) -> tuple[list[int], list[int]]:
    """Text part of an MMU record: pre-tokenised `input_ids`/`labels` when present, else built from `conversations`."""
    if record.get("input_ids") is not None and record.get("labels") is not None:
        prepared = record.get("mmu_format")  # set by prepare_mmu_dataset
        if prepared is not None and prepared != mmu_format:
            raise ValueError(
                f"This MMU record was tokenised for mmu_format={prepared!r} but the collator builds {mmu_format!r} "
                "text (the stage's format): prepare the data with prepare_mmu_dataset(..., "
                f"mmu_format={mmu_format!r})."
            )
        ids, labels = list(record["input_ids"]), list(record["labels"])
        if len(ids) != len(labels):
            raise BadRecordError("malformed record", "input_ids and labels differ in length")
        return _pad_right(ids, labels, spec.max_text_length, spec.pad_token_id)
    if tokenizer is None:
        raise ValueError("MMU records without input_ids/labels need a tokenizer (pass processor= to the collator).")
    conversations = record.get("conversations")
    if mmu_format == "finetune":
        return build_finetune_text(conversations, tokenizer, spec)
    if mmu_format == "align":
        return build_align_text(conversations, tokenizer, spec)
    raise ValueError(f"mmu_format must be one of {MMU_FORMATS}, got {mmu_format!r}.")


def build_mmu_example(text_ids: Sequence[int], text_labels: Sequence[int], spec: SequenceSpec) -> tuple[list, list]:
    """Full MMU training ids/labels: `<|mmu|> <|soi|> <image>×N <|eoi|> <|sot|>` + text (spec §4.3)."""
    prefix = [spec.mmu_token_id, spec.soi_token_id] + [spec.image_token_id] * spec.num_image_tokens
    prefix += [spec.eoi_token_id, spec.sot_token_id]
    return prefix + list(text_ids), [IGNORE_INDEX] * len(prefix) + list(text_labels)


# ---- T2I -----------------------------------------------------------------------------------------------------------


def build_t2i_prompt(caption_ids: Sequence[int], spec: SequenceSpec) -> list[int]:
    """`<|t2i|> <|sot|>` + caption slots (first `t2i_caption_length` ids, right-aligned after `[PAD]`) +
    `<|eot|> <|soi|>`: the 72-id prompt of spec §4.4/§4.5 (equal to `processor(text, generation_mode="image")`)."""
    kept = list(caption_ids)[: spec.t2i_caption_length]
    if not kept:
        raise BadRecordError("empty caption")
    slots = [spec.pad_token_id] * (spec.t2i_caption_length - len(kept)) + kept
    return [spec.t2i_token_id, spec.sot_token_id, *slots, spec.eot_token_id, spec.soi_token_id]


def build_t2i_example(caption_ids: Sequence[int], codes: Sequence[int], spec: SequenceSpec) -> tuple[list, list]:
    """Full T2I training ids/labels (spec §4.4): prompt + image ids + `<|eoi|>`; only the image ids are supervised."""
    if len(codes) != spec.num_image_codes:
        raise BadRecordError("bad image tokens", f"{len(codes)} codes, expected {spec.num_image_codes}")
    V = spec.text_vocab_size
    image_ids = [V + int(c) for c in codes]
    if any(not V <= i < V + spec.image_vocab_size for i in image_ids):
        raise BadRecordError("bad image tokens", f"codes must lie in [0, {spec.image_vocab_size})")
    prompt = build_t2i_prompt(caption_ids, spec)
    ids = prompt + image_ids + [spec.eoi_token_id]
    labels = [IGNORE_INDEX] * len(prompt) + image_ids + [IGNORE_INDEX]
    return ids, labels


def choose_caption(record: Mapping, draw: int | None = None) -> str:
    """One caption of a record (`captions` list or `caption` string), uniformly: `captions[draw % n]` with the
    sampler's deterministic `draw` (so resumed runs see the same captions), Python's `random` otherwise."""
    captions = record.get("captions")
    if captions is None:
        captions = [record.get("caption")] if record.get("caption") is not None else []
    if isinstance(captions, str):
        captions = [captions]
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise BadRecordError("empty caption")
    k = draw % len(captions) if draw is not None else random.randint(0, len(captions) - 1)
    return captions[k]


# ---- collators ----------------------------------------------------------------------------------------------------


def _as_image(value, image_root=None):
    """A record's image: PIL image, a `datasets.Image` dict ({"bytes", "path"}), a path, or None."""
    import os

    import PIL.Image

    if value is None or isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            from omnimamba_hf.processing import load_image

            return load_image(value["bytes"])
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, (str, os.PathLike)):
        from omnimamba_hf.processing import load_image

        path = resolve_image_path(value, image_root)
        return load_image(path)
    return value  # arrays / tensors: the image processor reads them


def resolve_image_path(path, image_root=None) -> str:
    """`image_root / path`; when missing, the original's fallback of the same name with `jpg` → `gif`."""
    import os

    full = os.path.join(os.fspath(image_root), os.fspath(path)) if image_root else os.fspath(path)
    if not os.path.exists(full) and "jpg" in full:
        alt = full.replace("jpg", "gif")
        if os.path.exists(alt):
            return alt
    return full


class OmniMambaMMUCollator:
    """MMU records → `input_ids`, `labels` `(B, 4 + num_image_tokens + max_text_length)`, `pixel_values`
    `(n_images, 2, 3, S, S)` (omitted when no sample has an image) and `image_flags` `(B,)`.

    A record: `{"image": PIL | path | datasets.Image dict | None, "conversations": [...]}` or pre-tokenised
    `{"image": ..., "input_ids": [...], "labels": [...]}` (text part only, from `prepare_mmu_dataset`).
    """

    def __init__(self, spec: SequenceSpec, tokenizer=None, image_processor=None, mmu_format: str = "finetune", image_root=None):
        if mmu_format not in MMU_FORMATS:
            raise ValueError(f"mmu_format must be one of {MMU_FORMATS}, got {mmu_format!r}.")
        self.spec, self.tokenizer, self.image_processor = spec, tokenizer, image_processor
        self.mmu_format, self.image_root = mmu_format, image_root

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("Empty MMU batch.")
        self.spec.check_mmu()
        ids, labels, images, flags = [], [], [], []
        for record in records:
            text_ids, text_labels = build_mmu_text(record, self.tokenizer, self.spec, self.mmu_format)
            row_ids, row_labels = build_mmu_example(text_ids, text_labels, self.spec)
            ids.append(row_ids)
            labels.append(row_labels)
            image = _as_image(record.get("image"), self.image_root)
            flags.append(image is not None)
            if image is not None:
                images.append(image)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "image_flags": torch.tensor(flags, dtype=torch.bool),
        }
        if images:
            if self.image_processor is None:
                raise ValueError("MMU records with images need an image processor (pass processor= to the collator).")
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch


class OmniMambaT2ICollator:
    """T2I records `{"tokens": [codes], "captions": [...] | "caption": str}` → `input_ids`, `labels` `(B, 329)`.
    Captions longer than `t2i_caption_length` tokens keep their first tokens (spec §8 #21)."""

    def __init__(self, spec: SequenceSpec, tokenizer=None):
        spec.check_t2i()
        self.spec, self.tokenizer = spec, tokenizer

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("Empty T2I batch.")
        ids, labels = [], []
        for record in records:
            codes = record.get("tokens")
            if codes is None:
                raise BadRecordError(
                    "missing image tokens",
                    "T2I records need VQ codes in 'tokens': pre-tokenise images once with "
                    "omnimamba_hf.training.pretokenize_images (datasets.map, cached)",
                )
            if record.get("caption_ids") is not None:
                caption_ids = record["caption_ids"]
            else:
                if self.tokenizer is None:
                    raise ValueError("T2I records without caption_ids need a tokenizer (pass processor= to the collator).")
                caption_ids = _encode(self.tokenizer, choose_caption(record, record.get("_draw")))
            row_ids, row_labels = build_t2i_example(caption_ids, codes, self.spec)
            ids.append(row_ids)
            labels.append(row_labels)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class OmniMambaDataCollator:
    """Collator for mixed MMU/T2I batches: groups records by their `"task"` key (or `default_task`) and returns
    `{"mmu": mmu_kwargs, "t2i": t2i_kwargs}` with only the tasks present.

    Args:
        config: the model's `OmniMambaConfig` (token ids, image slots, caption length, VQ grid).
        processor: an `OmniMambaProcessor` (its tokenizer and image processor), or None for pre-tokenised records
            without images.
        mmu_format: `"finetune"` (instruction conversations, stage 2) or `"align"` (captions, stage 1).
        max_text_length: the MMU text part (449 in the original).
        image_root: prefix of relative image paths.
        default_task: task of records without a `"task"` key.
    """

    def __init__(
        self,
        config,
        processor=None,
        mmu_format: str = "finetune",
        max_text_length: int = 449,
        image_root=None,
        default_task: str | None = None,
        tokenizer=None,
        image_processor=None,
    ):
        self.spec = SequenceSpec.from_config(config, max_text_length=max_text_length)
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor", None)
        if tokenizer is not None:
            _check_tokenizer(tokenizer, self.spec)
        self.mmu = OmniMambaMMUCollator(self.spec, tokenizer, image_processor, mmu_format, image_root)
        self.t2i = OmniMambaT2ICollator(self.spec, tokenizer)
        self.default_task = default_task

    @property
    def mmu_format(self) -> str:
        return self.mmu.mmu_format

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        groups: dict[str, list] = {}
        for record in records:
            task = record.get("task", self.default_task)
            if task not in TASKS:
                raise ValueError(f"Record task {task!r} is not one of {TASKS} (set default_task for single-task data).")
            groups.setdefault(task, []).append(record)
        if not groups:
            raise ValueError("Empty batch.")
        out = {}
        if "mmu" in groups:
            out["mmu"] = self.mmu(groups["mmu"])
        if "t2i" in groups:
            out["t2i"] = self.t2i(groups["t2i"])
        return out


def _check_tokenizer(tokenizer, spec: SequenceSpec) -> None:
    vocab = tokenizer.get_vocab()
    want = {"[PAD]": spec.pad_token_id, "<|soi|>": spec.soi_token_id, "<|eot|>": spec.eot_token_id, "<|mmu|>": spec.mmu_token_id}
    wrong = {tok: (vocab.get(tok), i) for tok, i in want.items() if vocab.get(tok) != i}
    if wrong:
        raise ValueError(
            f"The tokenizer does not match the model config: {wrong} (token: (tokenizer id, config id)). Build it with "
            "build_omnimamba_tokenizer from the checkpoint's base tokenizer."
        )
    if vocab.get(ENDOFTEXT) is None:
        raise ValueError("The tokenizer has no <|endoftext|> token (GPT-NeoX's id 0), which the training texts end with.")
    if len(tokenizer(ENDOFTEXT, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError("The tokenizer does not encode <|endoftext|> as one special token.")


__all__ = [
    "BadRecordError",
    "IGNORE_INDEX",
    "OmniMambaDataCollator",
    "OmniMambaMMUCollator",
    "OmniMambaT2ICollator",
    "SequenceSpec",
    "build_align_text",
    "build_finetune_text",
    "build_mmu_example",
    "build_mmu_text",
    "build_t2i_example",
    "build_t2i_prompt",
    "choose_caption",
    "resolve_image_path",
]
