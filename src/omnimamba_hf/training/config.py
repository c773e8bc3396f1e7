"""Training configuration: three dataclasses read by `transformers.HfArgumentParser` from a YAML file and/or the
command line (`omnimamba-hf train --config run.yaml --learning_rate 5e-5 ...`).

* `ModelArguments`: which weights (a checkpoint, or a config for random init, optional Mamba-2 / stage-1 init) and an
  optional user LoRA (PEFT) on `in_proj`.
* `DataArguments`: MMU (LLaVA-style) and T2I (pretokenised JSONL, or COCO captions + images to VQ-tokenise) sources,
  lengths, and the bad-record policy.
* `OmniMambaTrainingArguments(TrainingArguments)`: every Trainer option plus `stage` and the per-task batch sizes.

YAML files are flat (`key: value`, any field of the three classes) or sectioned (`model:`, `data:`, `training:`); the
original's `train:` block keys (`batch_size_t2i`, `lr`, ...) are accepted too. Precedence: stage preset defaults
(the original's hyper-parameters, `stages.stage_training_defaults`) < YAML < command line.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .stages import STAGES, get_stage, stage_training_defaults

logger = logging.getLogger(__name__)


def _no_stage(value) -> bool:
    """`--stage none` (or `stage: null` / `''` in the YAML): no preset, whatever the YAML file says."""
    return value is None or str(value).strip().lower() in ("", "none", "null")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An OmniMamba checkpoint (directory or hub id) to fine-tune."}
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Random initialisation from a config: a config.json path/dir, or 'omnimamba-1.3b' for the released "
            "layout. Used when model_name_or_path is not given."
        },
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Saved OmniMambaProcessor (default: model_name_or_path)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base GPT-NeoX tokenizer to build the processor from when none is saved (e.g. EleutherAI/gpt-neox-20b)."},
    )
    init_text_from: str | None = field(
        default=None,
        metadata={"help": "Mamba-2 LM checkpoint for the language backbone (stage 1: state-spaces/mamba2-1.3b weights)."},
    )
    stage1_mmu_checkpoint: str | None = field(
        default=None, metadata={"help": "Stage-1 MMU result to merge into the starting point (stage 2)."}
    )
    stage1_t2i_checkpoint: str | None = field(
        default=None, metadata={"help": "Stage-1 T2I result to merge into the starting point (stage 2)."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weight dtype when loading (mixed precision: --bf16).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    lora_r: int = field(default=0, metadata={"help": "User LoRA rank (PEFT) on in_proj; 0 = no user LoRA."})
    lora_alpha: float = field(default=16.0, metadata={"help": "User LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "User LoRA dropout."})
    lora_target_modules: str = field(
        default="in_proj",
        metadata={"help": "Comma-separated module names for the user LoRA (in_proj is the safe choice, see peft_utils)."},
    )


@dataclass
class DataArguments:
    mmu_data: str | None = field(
        default=None,
        metadata={"help": "LLaVA-style .json/.jsonl (image + conversations), a save_to_disk dir or a hub dataset."},
    )
    mmu_image_root: str | None = field(default=None, metadata={"help": "Directory the MMU image paths are relative to."})
    mmu_format: str | None = field(
        default=None,
        metadata={"help": "'finetune' (conversations, stage 2) or 'align' (captions, stage 1); default: the stage's."},
    )
    t2i_data: str | None = field(
        default=None,
        metadata={"help": "Pretokenised .jsonl (tokens + captions), a dataset with tokens, or a COCO captions json."},
    )
    t2i_image_root: str | None = field(
        default=None, metadata={"help": "Image directory for COCO-style T2I data (VQ-tokenised once, cached)."}
    )
    vq_cache_file: str | None = field(default=None, metadata={"help": "Cache file of the VQ pre-tokenisation."})
    vq_batch_size: int = field(default=32, metadata={"help": "Images per VQ-encoding batch."})
    max_text_length: int = field(default=449, metadata={"help": "MMU text part length (the original's 449)."})
    keep_text_only: bool = field(
        default=False, metadata={"help": "Keep MMU records without an image (zero-image layout); the original drops them."}
    )
    check_image_files: bool = field(default=True, metadata={"help": "Drop MMU records whose image file is missing."})
    on_bad_record: str = field(
        default="skip", metadata={"help": "'skip' (drop, counted in the log) or 'raise'.", "choices": ["skip", "raise"]}
    )
    eval_mmu_data: str | None = field(
        default=None, metadata={"help": "MMU evaluation data (as --mmu_data; eval_loss_mmu, with --eval_strategy)."}
    )
    eval_t2i_data: str | None = field(
        default=None, metadata={"help": "T2I evaluation data (as --t2i_data; eval_loss_t2i, with --eval_strategy)."}
    )
    max_mmu_samples: int | None = field(default=None, metadata={"help": "Use only the first N MMU records."})
    max_t2i_samples: int | None = field(default=None, metadata={"help": "Use only the first N T2I records."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "num_proc of datasets.map."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})


@dataclass
class OmniMambaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the OmniMamba recipe: `stage` (a preset of `stages.STAGES` that freezes / unfreezes
    exactly what the original does) and one batch size per task; `per_device_train_batch_size` is set to their sum."""

    stage: str | None = field(
        default=None,
        metadata={"help": f"Training stage preset: {', '.join(STAGES)}; None leaves requires_grad as given (e.g. PEFT)."},
    )
    per_device_mmu_batch_size: int = field(default=3, metadata={"help": "MMU samples per device and step."})
    per_device_t2i_batch_size: int = field(default=48, metadata={"help": "T2I samples per device and step."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs raw records."})

    def __post_init__(self):
        if _no_stage(self.stage):
            self.stage = None
        defaults = {f.name: f.default for f in fields(self) if f.name.startswith("per_device_")}
        if self.stage is not None:
            preset = get_stage(self.stage)
            self.stage = preset.name
            for task in ("mmu", "t2i"):
                name = f"per_device_{task}_batch_size"
                if task not in preset.tasks:
                    if getattr(self, name) not in (0, defaults[name]):
                        logger.warning(f"Stage {preset.name} trains no {task.upper()}: {name}={getattr(self, name)} is ignored.")
                    setattr(self, name, 0)
        if self.per_device_mmu_batch_size < 0 or self.per_device_t2i_batch_size < 0:
            raise ValueError("Per-task batch sizes must be >= 0.")
        total = self.per_device_mmu_batch_size + self.per_device_t2i_batch_size
        if total > 0:
            if self.per_device_train_batch_size not in (total, defaults["per_device_train_batch_size"]):
                logger.warning(
                    f"per_device_train_batch_size={self.per_device_train_batch_size} is replaced by the sum of the "
                    f"per-task batch sizes ({self.per_device_mmu_batch_size} MMU + {self.per_device_t2i_batch_size} "
                    "T2I): set per_device_mmu_batch_size / per_device_t2i_batch_size instead."
                )
            self.per_device_train_batch_size = total
        super().__post_init__()
        if self.torch_compile:
            # Compile for static shapes (accelerate reads this when it builds the dynamo plugin). With dynamic shapes
            # inductor (torch 2.13) fails on this model's backward at the second sequence length ("cannot determine
            # truth value of Relational: 1 < s40"); the collators pad to fixed lengths, so there are few shapes to
            # compile. Set ACCELERATE_DYNAMO_USE_DYNAMIC=1 to override.
            os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "False")

    @property
    def task_batch_sizes(self) -> dict[str, int]:
        return {"mmu": self.per_device_mmu_batch_size, "t2i": self.per_device_t2i_batch_size}


# ---- YAML + command line -------------------------------------------------------------------------------------------

# keys of the original's `train:` block (config/config_stage*.yaml) -> ours
_ORIGINAL_KEYS = {
    "batch_size_t2i": "per_device_t2i_batch_size",
    "batch_size_mmu": "per_device_mmu_batch_size",
    "lr": "learning_rate",
    "decay": "weight_decay",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "grad_accum": "gradient_accumulation_steps",
    "resume_dir": "resume_from_checkpoint",
    "dataset": "t2i_data",
    "num_workers": "dataloader_num_workers",
}
_IGNORED_ORIGINAL_KEYS = {"omnimamba_model", "image_backbone", "vq_ckpt", "t2i_task", "mmu_task", "omnimamba_ckpt", "mamba_pretrain"}
_ORIGINAL_STAGE = {"align": None, "finetune": "stage2"}


def _flatten_yaml(data: dict) -> dict:
    out = {}
    for key, value in (data or {}).items():
        if key in ("model", "data", "training", "train") and isinstance(value, dict):
            out.update(_flatten_yaml(value))
        elif key == "accelerate":
            continue  # launcher settings of the original's YAML: use `accelerate launch` / torchrun flags instead
        else:
            out[key] = value
    return out


def load_yaml_config(path: str) -> dict[str, Any]:
    """A YAML training config as a flat dict of field values (original `train:` keys translated)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = _flatten_yaml(yaml.safe_load(f) or {})
    out = {}
    original_stage = None
    for key, value in raw.items():
        if key in _IGNORED_ORIGINAL_KEYS:
            continue
        if key == "stage" and value in _ORIGINAL_STAGE:
            original_stage = value
            continue
        out[_ORIGINAL_KEYS.get(key, key)] = value
    if original_stage is not None and "stage" not in out:
        if original_stage == "finetune":
            out["stage"] = "stage2"
        else:  # original "align": the task flags say which stage-1 run
            t2i, mmu = raw.get("t2i_task"), raw.get("mmu_task")
            out["stage"] = "stage1_t2i" if t2i and not mmu else "stage1_mmu"
    return out


def field_names() -> set[str]:
    return {f.name for cls in (ModelArguments, DataArguments, OmniMambaTrainingArguments) for f in fields(cls) if f.init}


def parse_training_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, OmniMambaTrainingArguments]:
    """Parse `--config file.yaml`, `--stage`, and any field of the three dataclasses from `argv`.

    Stage defaults (the original recipe) apply to fields that neither the YAML nor the command line sets.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--stage", default=None)
    known, rest = pre.parse_known_args(argv)
    values = load_yaml_config(known.config) if known.config else {}
    if known.stage is not None:
        values["stage"] = known.stage
    if "stage" in values and _no_stage(values["stage"]):
        values["stage"] = None  # e.g. a LoRA run from a stage's YAML file
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise ValueError(f"Unknown training config keys {unknown} in {known.config}.")
    defaults = stage_training_defaults(values["stage"]) if values.get("stage") else {}
    import torch

    if not torch.cuda.is_available():  # the original's bf16 + tf32 are GPU settings (TrainingArguments rejects them)
        defaults.pop("tf32", None)
        defaults.pop("bf16", None)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, OmniMambaTrainingArguments),
        prog="omnimamba-hf train",
        description=(
            "Train OmniMamba with the two-stage recipe. --config FILE.yaml sets any of the options below (flat, or "
            f"in model:/data:/training: sections); --stage ({', '.join(STAGES)}) applies the original's "
            "hyper-parameters to whatever is not set. Command-line options override the YAML file."
        ),
    )
    parser.set_defaults(**{**defaults, **values})
    stage_argv = ["--stage", values["stage"]] if values.get("stage") else []
    return parser.parse_args_into_dataclasses(args=stage_argv + rest, look_for_args_file=False)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "OmniMambaTrainingArguments",
    "load_yaml_config",
    "parse_training_args",
]
