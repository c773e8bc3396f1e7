"""Training data for OmniMamba through 🤗 `datasets` (ORIGINAL-SPEC §4.3, §4.4, §7.4, §7.5).

* MMU: LLaVA-style JSON/JSONL (`{"image": relpath, "conversations": [{"from": "human"|"gpt", "value": ...}]}`), loaded
  by `load_llava_dataset`; `prepare_mmu_dataset` tokenises the text part once with `datasets.map` (cached with the
  dataset) and drops bad records with counts in the log (or raises).
* T2I: the original's pretokenised JSONL (`{"tokens": [256 VQ codes], "captions": [...]}`, `load_t2i_dataset`), or
  COCO-style image + captions (`load_coco_captions`) whose images `pretokenize_images` turns into VQ codes once, with
  `datasets.map` and a cache file keyed by the VQ weights; `prepare_t2i_dataset` validates.
* Text-only samples (records without an image) are kept on request (`keep_text_only=True`) and trained with the
  original's zero-image layout (§8 #8); the original drops them at load time in stage 2.

`MixedTaskDataset` puts the task datasets side by side (images are decoded in the DataLoader workers); and
`MixedTaskBatchSampler` builds each batch from a fixed number of samples per task (the original's 48 T2I + 3 MMU per
device) with the original's `max_size_cycle` epochs: an epoch is as long as the longer stream, the shorter restarts
(reshuffled) when exhausted. Shuffling is a deterministic function of `(seed, epoch)`, so `resume_from_checkpoint`
sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from .collators import (
    MMU_FORMATS,
    TASKS,
    BadRecordError,
    SequenceSpec,
    _as_image,
    build_mmu_text,
    choose_caption,
    resolve_image_path,
)

logger = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("skip", "raise")
_BAD = "_bad_reason"


# ---- loading ------------------------------------------------------------------------------------------------------


def _read_json_records(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, Mapping):
        for key in ("data", "examples", "annotations"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: expected a JSON list of records.")
    return data


def _llava_rows(path: str):
    for i, record in enumerate(_read_json_records(path)):
        image = record.get("image") if isinstance(record, Mapping) else None
        conversations = record.get("conversations") if isinstance(record, Mapping) else None
        turns = []
        if isinstance(conversations, list):
            for turn in conversations:
                if isinstance(turn, Mapping):
                    turns.append({"from": str(turn.get("from", turn.get("role", ""))), "value": turn.get("value", turn.get("content"))})
                else:
                    turns.append({"from": "", "value": None})
        yield {
            "id": str(record.get("id", i)) if isinstance(record, Mapping) else str(i),
            "image": str(image) if image is not None else None,
            "conversations": turns,
        }


def _load_any(source, split: str = "train"):
    """A `datasets.Dataset` from a Dataset, a `save_to_disk` directory, or a hub / builder name."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        loaded = datasets.load_from_disk(os.fspath(source))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(source, split=split)


def load_llava_dataset(source, cache_dir: str | None = None, split: str = "train"):
    """LLaVA-style records as a `datasets.Dataset` with columns `id`, `image` (relative path or None) and
    `conversations` (list of `{"from", "value"}`). `source`: a `.json` / `.jsonl` file (read once through
    `Dataset.from_generator` and cached as Arrow; heterogeneous fields such as int/str ids are normalised), or anything
    `datasets` loads (a Dataset, a `save_to_disk` directory, a hub name) with those columns."""
    import datasets

    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith((".json", ".jsonl")):
        path = os.path.abspath(os.fspath(source))
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Value("string"),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            }
        )
        stat = os.stat(path)
        return datasets.Dataset.from_generator(
            _llava_rows,
            gen_kwargs={"path": path},
            features=features,
            cache_dir=cache_dir,
            # re-read when the file changes
            config_name=hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16],
        )
    return _load_any(source, split)


def load_t2i_dataset(source, split: str = "train"):
    """T2I records: the original's pretokenised JSONL (`tokens` + `captions`), or any dataset with `tokens` and
    `captions` / `caption` columns (or `image` + captions, to be VQ-tokenised with `pretokenize_images`)."""
    import datasets

    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith((".json", ".jsonl")):
        return datasets.load_dataset("json", data_files=os.fspath(source), split="train")
    return _load_any(source, split)


def load_coco_captions(annotation_file: str, image_root: str | None = None):
    """COCO captions (`captions_train2014.json`: `images` + `annotations`) → one record per image:
    `{"image": path, "captions": [...]}` (paths joined with `image_root`), in sorted image-id order."""
    import datasets

    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    captions: dict[Any, list[str]] = {}
    for ann in coco["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    rows = {"image": [], "captions": []}
    for image_id in sorted(files):
        path = files[image_id]
        rows["image"].append(os.path.join(image_root, path) if image_root else path)
        rows["captions"].append(captions.get(image_id, []))
    return datasets.Dataset.from_dict(rows)


# ---- validation ---------------------------------------------------------------------------------------------------


def _finish_filter(dataset, name: str, on_bad_record: str, extra: Counter | None = None):
    """Count `_bad_reason`, log or raise, drop the bad rows and the helper column."""
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}.")
    reasons = Counter(r for r in dataset[_BAD] if r)
    total = len(dataset)
    n_bad = sum(reasons.values())
    if n_bad:
        summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        if on_bad_record == "raise":
            first = next(i for i, r in enumerate(dataset[_BAD]) if r)
            raise BadRecordError(
                "bad records",
                f"{name}: {n_bad} of {total} records are unusable ({summary}); the first is row {first}: "
                f"{dataset[first][_BAD]}. Fix the data or pass on_bad_record='skip'.",
            )
        logger.warning(f"{name}: skipping {n_bad} of {total} records ({summary}).")
    if extra:
        logger.warning(f"{name}: " + ", ".join(f"{c} {r}" for r, c in extra.items()))
    if n_bad == total:
        raise BadRecordError("no usable records", f"{name}: all {total} records are unusable ({dict(reasons)}).")
    if n_bad:
        dataset = dataset.filter(lambda r: not r, input_columns=[_BAD], desc=f"{name}: dropping bad records")
    return dataset.remove_columns(_BAD)


# the text format each pre-tokenised MMU record was built in (`prepare_mmu_dataset`), checked by the collator
MMU_FORMAT_COLUMN = "mmu_format"


def prepare_mmu_dataset(
    dataset,
    processor=None,
    config=None,
    mmu_format: str = "finetune",
    max_text_length: int = 449,
    image_root: str | None = None,
    keep_text_only: bool = False,
    check_image_files: bool = True,
    on_bad_record: str = "skip",
    num_proc: int | None = None,
    tokenizer=None,
    spec: SequenceSpec | None = None,
):
    """Tokenise the text part of every MMU record once (`datasets.map`, cached) and validate.

    Adds `input_ids` / `labels` (`max_text_length` each, spec §4.3) and `mmu_format` (which the collator checks
    against its own: stage 1 trains on captions, stage 2 on conversations); the images stay paths, decoded in the DataLoader
    workers. Bad records — empty or malformed conversation, no supervised token within `max_text_length` (over-long),
    missing image file (`check_image_files`), no image unless `keep_text_only` — are dropped with a count per reason in
    the log (`on_bad_record="skip"`) or raise `BadRecordError` (`"raise"`); a dataset without any usable record
    always raises.
    """
    if mmu_format not in MMU_FORMATS:
        raise ValueError(f"mmu_format must be one of {MMU_FORMATS}, got {mmu_format!r}.")
    tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("prepare_mmu_dataset needs a processor (or tokenizer).")
    spec = spec or SequenceSpec.from_config(config, max_text_length=max_text_length)
    spec.check_mmu()
    dataset = _load_any(dataset)
    if "conversations" not in dataset.column_names:
        raise ValueError(f"MMU data needs a 'conversations' column; got {dataset.column_names}.")
    has_image_column = "image" in dataset.column_names
    root = os.fspath(image_root) if image_root else None
    import datasets

    decoded_images = has_image_column and isinstance(dataset.features["image"], datasets.Image)
    if decoded_images:  # do not decode every image just to tokenise the text
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def tokenize(record):
        out = {"input_ids": [spec.pad_token_id] * spec.max_text_length, "labels": [-100] * spec.max_text_length, _BAD: ""}
        out[MMU_FORMAT_COLUMN] = mmu_format  # the collator checks it against its own format (stage 1 vs 2 text)
        image = record.get("image") if has_image_column else None
        if image is None and not keep_text_only:
            out[_BAD] = "no image (text-only records need keep_text_only=True)"
            return out
        if isinstance(image, (list, tuple)):  # multi-image LLaVA records: OmniMamba's layout has one image slot
            out[_BAD] = "a list of images (OmniMamba takes one image per record)"
            return out
        if check_image_files and isinstance(image, str) and not os.path.exists(resolve_image_path(image, root)):
            out[_BAD] = "missing image file"
            return out
        try:
            ids, labels = build_mmu_text({"conversations": record["conversations"]}, tokenizer, spec, mmu_format)
        except BadRecordError as err:
            out[_BAD] = err.reason
            return out
        out["input_ids"], out["labels"] = ids, labels
        return out

    dataset = dataset.map(tokenize, num_proc=num_proc, desc=f"MMU ({mmu_format}): tokenising")
    dataset = _finish_filter(dataset, f"MMU data ({mmu_format})", on_bad_record)
    if decoded_images:
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def prepare_t2i_dataset(dataset, config=None, on_bad_record: str = "skip", num_proc: int | None = None, spec=None):
    """Validate T2I records (`tokens`: `grid²` codes in range; at least one non-empty caption) and normalise the
    caption field to `captions` (a list). Empty captions inside a list are removed (counted in the log)."""
    spec = spec or SequenceSpec.from_config(config)
    spec.check_t2i()
    dataset = _load_any(dataset)
    if "tokens" not in dataset.column_names:
        raise ValueError(
            "T2I data needs VQ codes in a 'tokens' column: pre-tokenise the images once with pretokenize_images() "
            f"(got columns {dataset.column_names})."
        )
    if "captions" not in dataset.column_names and "caption" not in dataset.column_names:
        raise ValueError(f"T2I data needs 'captions' (list) or 'caption' (string); got {dataset.column_names}.")

    def check(record):
        captions = record.get("captions")
        if captions is None:
            captions = [record.get("caption")]
        if isinstance(captions, str):
            captions = [captions]
        kept = [c for c in captions if isinstance(c, str) and c.strip()]
        out = {"captions": kept, _BAD: "", "_empty_captions": len(captions) - len(kept)}
        tokens = record.get("tokens")
        if not kept:
            out[_BAD] = "no non-empty caption"
        elif tokens is None or len(tokens) != spec.num_image_codes:
            out[_BAD] = f"image tokens not {spec.num_image_codes} codes"
        elif not all(isinstance(t, int) or (isinstance(t, float) and t.is_integer()) for t in tokens):
            out[_BAD] = "image tokens not integer codes"
        elif min(tokens) < 0 or max(tokens) >= spec.image_vocab_size:
            out[_BAD] = f"image tokens outside [0, {spec.image_vocab_size})"
        if out[_BAD]:
            out["_empty_captions"] = 0  # counted with the bad record already
        return out

    remove = ["caption"] if "caption" in dataset.column_names else []
    dataset = dataset.map(check, num_proc=num_proc, remove_columns=remove, desc="T2I: validating")
    empties = sum(dataset["_empty_captions"])
    dataset = dataset.remove_columns("_empty_captions")
    extra = Counter({"empty captions removed from caption lists": empties}) if empties else None
    return _finish_filter(dataset, "T2I data", on_bad_record, extra)


# ---- VQ pre-tokenisation ----------------------------------------------------------------------------------------


def vq_fingerprint(vq_model) -> str:
    """A hash of the VQ weights (the cache key of `pretokenize_images`)."""
    h = hashlib.sha1()
    for name, tensor in sorted(vq_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def pretokenize_images(
    dataset,
    vq_model,
    image_processor=None,
    image_column: str = "image",
    image_root: str | None = None,
    batch_size: int = 32,
    device=None,
    cache_file_name: str | None = None,
    on_bad_record: str = "skip",
    keep_image_column: bool = False,
):
    """VQ-encode every image once (spec §7.5: centre crop, Lanczos resize to the VQ image size, `[-1, 1]`, LlamaGen
    nearest-code) into a `tokens` column, with `datasets.map`.

    The result is cached: in the dataset's cache directory (file-backed datasets) or at `cache_file_name`, under a
    fingerprint of the input dataset, the VQ weights and the preprocessing, so a second call (or run) reloads it.
    Images that cannot be read are dropped with a count (`on_bad_record="skip"`) or raise (`"raise"`).
    """
    from datasets.fingerprint import Hasher

    if image_processor is None:
        from omnimamba_hf.processing import OmniMambaImageProcessor

        image_processor = OmniMambaImageProcessor()
    dataset = _load_any(dataset)
    size = vq_model.config.image_size
    device = torch.device(device) if device is not None else next(vq_model.parameters()).device
    vq_model = vq_model.to(device).eval()
    root = os.fspath(image_root) if image_root else None
    fingerprint = Hasher.hash(
        [dataset._fingerprint, vq_fingerprint(vq_model), size, image_column, root, "omnimamba-vq-v1", keep_image_column]
    )

    def encode(batch):
        n = len(batch[image_column])
        tokens, bad, pixels, rows = [None] * n, [""] * n, [], []
        for i, value in enumerate(batch[image_column]):
            try:
                image = _as_image(value, root)
                if image is None:
                    raise ValueError("no image")
                pixels.append(image_processor.preprocess_for_vq(image, size))
                rows.append(i)
            except Exception as err:  # unreadable / missing image: reported below
                bad[i] = "unreadable image" if not isinstance(err, FileNotFoundError) else "missing image file"
                if "not an existing file" in str(err):
                    bad[i] = "missing image file"
        if pixels:
            codes = vq_model.encode_to_codes(torch.stack(pixels).to(device)).cpu().tolist()
            for i, c in zip(rows, codes):
                tokens[i] = c
        return {"tokens": tokens, _BAD: bad}

    remove = [] if keep_image_column else [image_column]
    dataset = dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        remove_columns=remove,
        desc="VQ-tokenising images",
    )
    return _finish_filter(dataset, "VQ pre-tokenisation", on_bad_record)


# ---- the mixed dataset and its sampler ----------------------------------------------------------------------------


class MixedTaskDataset(torch.utils.data.Dataset):
    """MMU and T2I datasets side by side. Index `(task_position, row, draw)` (what `MixedTaskBatchSampler` yields) or
    a flat int; an item is the record plus `"task"` and `"_draw"` (the sampler's random number, which picks the T2I
    caption deterministically).

    MMU images are decoded here, i.e. in the DataLoader workers. An image that fails to decode at run time (a
    corrupt file that passed the load-time existence check) is handled by `on_bad_record`: `"skip"` takes the next
    record of the same task instead (logged with a running count), `"raise"` raises `BadRecordError` naming the file,
    `"text_only"` keeps the sample with zero image features (the original's fallback).
    """

    def __init__(
        self,
        mmu=None,
        t2i=None,
        image_root: str | None = None,
        on_bad_record: str = "skip",
        max_substitutions: int = 16,
    ):
        if on_bad_record not in (*BAD_RECORD_POLICIES, "text_only"):
            raise ValueError(f"on_bad_record must be 'skip', 'raise' or 'text_only', got {on_bad_record!r}.")
        self.datasets = {name: ds for name, ds in (("mmu", mmu), ("t2i", t2i)) if ds is not None}
        if not self.datasets:
            raise ValueError("MixedTaskDataset needs at least one of mmu / t2i.")
        for name, ds in self.datasets.items():
            if len(ds) == 0:
                raise ValueError(f"The {name} dataset is empty.")
        self.tasks = tuple(t for t in TASKS if t in self.datasets)
        self.image_root = image_root
        self.on_bad_record = on_bad_record
        self.max_substitutions = max_substitutions
        self.num_substituted = 0

    @property
    def task_sizes(self) -> dict[str, int]:
        return {t: len(self.datasets[t]) for t in self.tasks}

    def __len__(self) -> int:
        return sum(self.task_sizes.values())

    def _locate(self, index) -> tuple[str, int, int | None]:
        if isinstance(index, (tuple, list)):
            task_position, row, draw = index
            return TASKS[task_position], int(row), int(draw)
        index = int(index)
        for task in self.tasks:
            n = len(self.datasets[task])
            if index < n:
                return task, index, None
            index -= n
        raise IndexError("MixedTaskDataset index out of range.")

    def _load(self, task: str, row: int, draw: int | None) -> dict:
        ds = self.datasets[task]
        for attempt in range(self.max_substitutions + 1):
            record = dict(ds[(row + attempt) % len(ds)])
            record["task"], record["_draw"] = task, draw
            if task == "mmu" and record.get("image") is not None:
                try:
                    record["image"] = _as_image(record["image"], self.image_root)
                except Exception as err:
                    where = record.get("image") if isinstance(record.get("image"), str) else f"row {row + attempt}"
                    if self.on_bad_record == "raise":
                        raise BadRecordError("unreadable image", f"MMU record {row + attempt} ({where}): {err}") from err
                    if self.on_bad_record == "text_only":
                        logger.warning(f"MMU record {row + attempt}: unreadable image {where} ({err}); zero image features.")
                        record["image"] = None
                        return record
                    self.num_substituted += 1
                    logger.warning(
                        f"MMU record {row + attempt}: unreadable image {where} ({err}); skipped, using the next record "
                        f"({self.num_substituted} skipped in this worker so far)."
                    )
                    continue
            return record
        raise BadRecordError("unreadable images", f"{self.max_substitutions + 1} consecutive {task} records failed to load.")

    def __getitem__(self, index) -> dict:
        return self._load(*self._locate(index))

    def attach_sampler(self, sampler) -> None:
        """Forward `set_epoch` to `sampler`. accelerate calls `dataset.set_epoch` when it cannot reach the batch
        sampler itself (a resumed multi-process run wraps it twice: `SkipBatchSampler(BatchSamplerShard(...))`)."""
        import weakref

        self.__dict__.setdefault("_samplers", []).append(weakref.ref(sampler))

    def set_epoch(self, epoch: int) -> None:
        for ref in self.__dict__.get("_samplers", []):
            sampler = ref()
            if sampler is not None:
                sampler.set_epoch(epoch)

    def __getstate__(self):  # DataLoader workers get the data, not the (main-process) sampler references
        state = dict(self.__dict__)
        state.pop("_samplers", None)
        return state


class MixedTaskBatchSampler:
    """Batches with a fixed number of samples per task, e.g. `{"t2i": 48, "mmu": 3}` (the original per device).

    Epochs follow Lightning's `CombinedLoader(mode="max_size_cycle")` as the original used it: one epoch has as many
    batches as the longer stream (`ceil` for T2I unless `drop_last`, `floor` for MMU which the original always
    drops), the shorter stream is reshuffled and restarted when exhausted. With `cycle=False` (evaluation) each stream
    is read once and later batches hold only the longer stream. The order is a function of `(seed, epoch)` alone.

    Yields lists of `(task_position, row, draw)` indices for `MixedTaskDataset`. `accelerate` shards whole batches
    across processes (`BatchSamplerShard`), so every device gets its own mixed batches.
    """

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        batch_sizes: Mapping[str, int],
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        cycle: bool = True,
    ):
        self.sizes = {t: int(task_sizes.get(t, 0)) for t in TASKS}
        self.batch_sizes = {t: int(batch_sizes.get(t, 0) or 0) for t in TASKS}
        self.active = [t for t in TASKS if self.batch_sizes[t] > 0]
        if not self.active:
            raise ValueError("All per-task batch sizes are 0: set per_device_mmu_batch_size / per_device_t2i_batch_size.")
        for t in self.active:
            if self.sizes[t] == 0:
                raise ValueError(f"The {t} batch size is {self.batch_sizes[t]} but there is no {t} data.")
        self.seed, self.shuffle, self.drop_last, self.cycle = seed, shuffle, drop_last, cycle
        for t in self.active:
            if self._batches_per_stream(t) == 0:
                raise ValueError(
                    f"{self.sizes[t]} {t} records cannot fill one batch of {self.batch_sizes[t]} (incomplete batches are "
                    "dropped): lower the batch size or add data."
                )
        self.epoch = 0
        self.batch_size = None  # variable (last partial batch): tells accelerate not to assume a fixed size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches_per_stream(self, task: str) -> int:
        n, b = self.sizes[task], self.batch_sizes[task]
        if task == "mmu" or self.drop_last:  # the original's MMU loader has drop_last=True
            return n // b
        return -(-n // b)

    def __len__(self) -> int:
        return max(self._batches_per_stream(t) for t in self.active)

    def _stream(self, task: str, generator: torch.Generator):
        """Endless (or single-pass) chunks of rows of one task; reshuffled at every restart."""
        n, b = self.sizes[task], self.batch_sizes[task]
        per_pass = self._batches_per_stream(task)
        while True:
            order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
            for k in range(per_pass):
                yield order[k * b : (k + 1) * b]
            if not self.cycle:
                return

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draw_generator = torch.Generator().manual_seed(self.seed * 1_000_033 + self.epoch + 7)
        streams = {t: self._stream(t, generator) for t in self.active}
        for _ in range(len(self)):
            batch = []
            for t in self.active:
                rows = next(streams[t], None)
                if rows is None:
                    continue
                draws = torch.randint(0, 2**31 - 1, (len(rows),), generator=draw_generator).tolist()
                batch += [(TASKS.index(t), r, d) for r, d in zip(rows, draws)]
            if batch:
                yield batch


__all__ = [
    "BAD_RECORD_POLICIES",
    "MixedTaskBatchSampler",
    "MixedTaskDataset",
    "choose_caption",
    "load_coco_captions",
    "load_llava_dataset",
    "load_t2i_dataset",
    "prepare_mmu_dataset",
    "prepare_t2i_dataset",
    "pretokenize_images",
    "vq_fingerprint",
]
