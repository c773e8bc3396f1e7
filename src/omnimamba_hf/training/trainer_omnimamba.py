"""`OmniMambaTrainer`: `transformers.Trainer` for OmniMamba's mixed MMU + T2I training (ORIGINAL-SPEC §7.3, §7.4).

**How a step works.** The training DataLoader is built from a `MixedTaskDataset` and a `MixedTaskBatchSampler`, so
every batch holds a fixed number of samples per task (e.g. 48 T2I + 3 MMU per device). The collator returns
`{"mmu": kwargs, "t2i": kwargs}`; `compute_loss` runs one single-task forward per task present and returns
`loss = loss_mmu + loss_t2i` (each the token mean of its own cross-entropy, spec §4.6), which the Trainer
back-propagates once — exactly the original's two forwards + one backward. It is not one mixed forward because the
two layouts have very different lengths (329 vs 1182): one batch would pad every T2I row to 1182 and triple its cost.
Both graphs are alive until the backward, as in the original.

**Logging.** `loss_mmu` and `loss_t2i` are logged next to `loss` at every logging step: the mean over the micro-batches
since the last log of each task's token-mean loss, averaged over processes (so `loss ≈ loss_mmu + loss_t2i`).
Evaluation adds `eval_loss_mmu` / `eval_loss_t2i`.

**Everything else is the Trainer's.** Gradient accumulation (the per-batch mean is divided by the accumulation
steps), bf16/fp16 autocast, activation checkpointing, `resume_from_checkpoint` (the sampler order depends only on
`(seed, epoch)`; skipped batches are not loaded), `torch_compile`, DDP/FSDP through accelerate (`accelerate launch` or
`torchrun`): each process gets its own mixed batches (accelerate shards the batch sampler).

**Stage presets.** `args.stage` (or `stage=`) applies a preset of `stages.STAGES` before the optimiser exists:
requires_grad exactly as the original, and the original's module modes (frozen towers stay in eval mode although the
Trainer calls `model.train()` every step). The trainable / frozen counts are logged and kept in `self.stage_report`.

**Weight decay** (`get_decay_parameter_names`): matrices (ndim >= 2) are decayed; vectors (norms, biases, `A_log`, `D`,
`dt_bias`) and everything tagged `_no_weight_decay` (the position tables) are not. (The original decays every
ndim >= 2 tensor, position tables included, but trains with weight decay 0.)
"""

from __future__ import annotations

import copy
import logging
import math
import re
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import seed_worker

from .collators import TASKS, OmniMambaDataCollator
from .data import MixedTaskBatchSampler, MixedTaskDataset
from .stages import apply_stage, get_stage, stage_eval_modules, unwrap_omnimamba

logger = logging.getLogger(__name__)

# never decayed, whatever their shape (name fallback for the `_no_weight_decay` tag, which FSDP flattening and some
# loading paths do not preserve)
NO_DECAY_NAME_PATTERNS = (r"(^|\.)A_log$", r"(^|\.)D$", r"(^|\.)dt_bias$", r"position_embeddings$", r"(^|\.)bias$", r"norm")


_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_token_snapshot(model) -> list:
    base = unwrap_omnimamba(model)
    holders = [getattr(base, "config", None), getattr(base, "generation_config", None)]
    if holders[0] is not None and hasattr(holders[0], "get_text_config"):
        holders.append(holders[0].get_text_config())
    return [(h, {k: copy.deepcopy(getattr(h, k, None)) for k in _SPECIAL}) for h in holders if h is not None]


class _KeepSpecialTokens(TrainerCallback):
    """`Trainer.train` aligns the model's bos/eos/pad ids with the tokenizer's (GPT-NeoX declares bos = eos =
    `<|endoftext|>`); OmniMamba's config deliberately has no BOS (spec §1.4), so the ids are put back before the first
    step (and hence before any checkpoint is written)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def on_train_begin(self, args, state, control, **kwargs):
        for holder, values in self.snapshot:
            for key, value in values.items():
                if getattr(holder, key, None) != value:
                    setattr(holder, key, value)


class OmniMambaTrainer(Trainer):
    r"""
    `Trainer` for `OmniMambaForConditionalGeneration` (plain, PEFT-wrapped or compiled).

    Args:
        model, args, train_dataset, eval_dataset, processing_class, ...: as `Trainer`. `args` is best an
            `OmniMambaTrainingArguments` (stage + per-task batch sizes); a plain `TrainingArguments` works with
            `task_batch_sizes=`.
        data_collator: defaults to `OmniMambaDataCollator(model.config, processing_class, mmu_format=<stage's>,
            max_text_length=max_text_length)`.
        stage (`str`, *optional*): overrides `args.stage`.
        task_batch_sizes (`dict`, *optional*): `{"mmu": 3, "t2i": 48}`, overrides the args' per-task sizes.
        max_text_length (`int`, defaults to 449, the original's): MMU text length of the default collator (ignored
            when `data_collator` is given).

    `train_dataset` / `eval_dataset`: a `MixedTaskDataset` (mixed batches at the configured ratio). Any other dataset
    goes through the standard Trainer DataLoader: its items need a `"task"` key (or a collator `default_task`).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        stage: str | None = None,
        task_batch_sizes: dict[str, int] | None = None,
        max_text_length: int = 449,
        **kwargs,
    ):
        if args is None:
            from .config import OmniMambaTrainingArguments

            args = OmniMambaTrainingArguments(output_dir="trainer_output")
        self.stage = get_stage(stage or args.stage).name if (stage or getattr(args, "stage", None)) else None
        if self.stage is not None and model is not None and hasattr(model, "peft_config"):
            # a stage unfreezes base parameters, but a PEFT model saves (and checkpoints) its adapter only
            raise ValueError(
                f"Stage preset {self.stage!r} with a PEFT model: the preset would train base parameters that the PEFT "
                "model never saves, so their training would be lost. Train the LoRA alone with no stage "
                "(`--stage none` on the command line, stage=None here), or train the stage without the LoRA."
            )
        self.stage_report = None
        self._eval_modules: list[nn.Module] = []
        if self.stage is not None and model is not None:
            self.stage_report = apply_stage(model, self.stage, log=False)
            self._eval_modules = stage_eval_modules(model, self.stage)
        sizes = dict(getattr(args, "task_batch_sizes", None) or {})
        if not sizes:
            sizes = {t: args.per_device_train_batch_size for t in TASKS}
        sizes.update(task_batch_sizes or {})
        self.task_batch_sizes = sizes
        if data_collator is None and model is not None:
            mmu_format = get_stage(self.stage).mmu_format if self.stage else None
            data_collator = OmniMambaDataCollator(
                unwrap_omnimamba(model).config, processing_class, mmu_format=mmu_format or "finetune",
                max_text_length=max_text_length,
            )
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if model is not None:
            callbacks.append(_KeepSpecialTokens(_special_token_snapshot(model)))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
        self.loss_is_scaled_for_ga = False
        self._task_loss = {"train": self._zero_accumulator(), "eval": self._zero_accumulator()}
        if self.stage_report is not None and self.is_world_process_zero():
            logger.info(self.stage_report.format())

    # ---- data -----------------------------------------------------------------------------------------------------

    def _task_sizes_for(self, dataset: MixedTaskDataset) -> dict[str, int]:
        sizes = {t: int(self.task_batch_sizes.get(t, 0) or 0) if t in dataset.tasks else 0 for t in TASKS}
        if self.stage is not None:
            tasks = get_stage(self.stage).tasks
            sizes = {t: (n if t in tasks else 0) for t, n in sizes.items()}
        return sizes

    def _mixed_dataloader(self, dataset: MixedTaskDataset, training: bool) -> DataLoader:
        args = self.args
        batch_sizes = self._task_sizes_for(dataset)
        sampler = MixedTaskBatchSampler(
            dataset.task_sizes,
            batch_sizes,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            shuffle=training,
            drop_last=args.dataloader_drop_last,
            cycle=training,
        )
        dataset.attach_sampler(sampler)
        params: dict[str, Any] = {
            "batch_sampler": sampler,
            "collate_fn": self.data_collator,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
        }
        if args.dataloader_num_workers > 0:
            params["prefetch_factor"] = args.dataloader_prefetch_factor
            if args.dataloader_multiprocessing_context:
                params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        if training:
            params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
        if self.is_world_process_zero():
            mix = " + ".join(f"{n} {t.upper()}" for t, n in batch_sizes.items() if n)
            logger.info(f"{'Training' if training else 'Evaluation'} batches per device: {mix}; {len(sampler)} batches per epoch.")
        return self.accelerator.prepare(DataLoader(dataset, **params))

    def get_train_dataloader(self) -> DataLoader:
        if isinstance(self.train_dataset, MixedTaskDataset):
            return self._mixed_dataloader(self.train_dataset, training=True)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None and not isinstance(eval_dataset, str) else None
        if dataset is None:
            dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else self.eval_dataset
        if isinstance(dataset, MixedTaskDataset):
            return self._mixed_dataloader(dataset, training=False)
        return super().get_eval_dataloader(eval_dataset)

    # ---- loss -----------------------------------------------------------------------------------------------------

    def _zero_accumulator(self) -> torch.Tensor:
        # rows: mmu, t2i; columns: loss sum, micro-batch count. On the device: no host sync per step.
        return torch.zeros(len(TASKS), 2, dtype=torch.float32, device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """`sum over tasks of model(**inputs[task], task=task).loss`: one single-task forward per task in the batch."""
        if model.training and self._eval_modules:
            for module in self._eval_modules:  # the Trainer just called model.train(); restore the preset's modes
                module.eval()
        present = [t for t in TASKS if t in inputs]
        if not present:
            if "input_ids" in inputs and "task" in inputs:  # a plain single-task batch
                outputs = model(**inputs)
                return (outputs.loss, outputs) if return_outputs else outputs.loss
            raise ValueError(f"A batch must hold 'mmu' and/or 't2i' sub-batches; got keys {list(inputs)}.")
        total = None
        outputs = {}
        accumulator = self._task_loss["train" if model.training else "eval"]
        for task in present:
            sub = inputs[task]
            out = model(**sub, task=task, use_cache=False, logits_to_keep=0 if return_outputs else 1)
            if out.loss is None:
                raise ValueError(f"The {task} sub-batch has no labels.")
            total = out.loss if total is None else total + out.loss
            row = TASKS.index(task)
            accumulator[row, 0] += out.loss.detach().float().to(accumulator.device)
            accumulator[row, 1] += 1
            if return_outputs:
                outputs[task] = out
        return (total, outputs) if return_outputs else total

    def _drain_task_losses(self, mode: str, prefix: str) -> dict[str, float]:
        acc = self._task_loss[mode]
        self._task_loss[mode] = self._zero_accumulator()
        if self.accelerator.num_processes > 1:
            acc = self.accelerator.reduce(acc, reduction="sum")
        acc = acc.cpu()
        out = {}
        for row, task in enumerate(TASKS):
            if acc[row, 1] > 0:
                out[f"{prefix}{task}"] = round(float(acc[row, 0] / acc[row, 1]), 6)
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):  # a training log
            logs = {**logs, **self._drain_task_losses("train", "loss_")}
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._task_loss["eval"] = self._zero_accumulator()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=True, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        per_task = self._drain_task_losses("eval", f"{metric_key_prefix}_loss_")
        output.metrics.update(per_task)
        if per_task:
            # The eval stream is not cycled, so its batches hold unequal task mixes and Trainer's mean over batches
            # would weight the tasks by their batch counts. The loss is the sum of the per-task means, as in training
            # (spec §4.6), and so is what metric_for_best_model="loss" selects on.
            output.metrics[f"{metric_key_prefix}_loss"] = round(sum(per_task.values()), 6)
        return output

    def floating_point_ops(self, inputs) -> int:
        """6 · tokens · non-embedding parameters, summed over the task sub-batches."""
        if not isinstance(inputs, dict) or not any(t in inputs for t in TASKS):
            return super().floating_point_ops(inputs)
        model = unwrap_omnimamba(self.model)
        if not hasattr(self, "_flop_params"):
            self._flop_params = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
        return sum(6 * inputs[t]["input_ids"].numel() * self._flop_params for t in TASKS if t in inputs)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def _reload_weights(self, checkpoint: str, model: nn.Module) -> bool:
        """Load a full-model checkpoint through `from_pretrained` (its key conversions included), then copy.

        `Trainer._load_from_checkpoint` reads `model.safetensors` with a raw `load_state_dict(strict=False)`. Since
        transformers 5, `save_pretrained` writes some sub-models under their legacy key names (here the DINOv2 tower:
        `attention.attention.query` for `attention.q_proj`) and only `from_pretrained` maps them back, so the raw load
        leaves those weights silently un-restored (logged as missing/unexpected keys). Returns False when this path
        does not apply (PEFT adapters, FSDP/DeepSpeed, no `model.safetensors`), leaving it to the Trainer."""
        import os

        from transformers import PreTrainedModel

        target = model.module if hasattr(model, "module") else model
        if (
            self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or not isinstance(target, PreTrainedModel)
            or hasattr(target, "peft_config")
            or not os.path.isfile(os.path.join(checkpoint, "model.safetensors"))
        ):
            return False
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(checkpoint, dtype=dtype)
        result = target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        logger.info(f"Restored all model weights from {checkpoint} ({result}).")
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._reload_weights(resume_from_checkpoint, model if model is not None else self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._reload_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    # ---- optimiser ------------------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Matrices are decayed; vectors, `A_log`/`D`/`dt_bias`, norms, biases and position tables are not."""
        names = []
        for name, p in model.named_parameters():
            if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
                continue
            if any(re.search(pattern, name) for pattern in NO_DECAY_NAME_PATTERNS):
                continue
            names.append(name)
        return names


def task_loss_history(log_history: list[dict]) -> dict[str, list[float]]:
    """`{"loss": [...], "loss_mmu": [...], "loss_t2i": [...]}` from `trainer.state.log_history` (training logs)."""
    out: dict[str, list[float]] = {"loss": [], "loss_mmu": [], "loss_t2i": []}
    for entry in log_history:
        if "loss" in entry:
            for key in out:
                out[key].append(entry.get(key, math.nan))
    return out


__all__ = ["OmniMambaTrainer", "task_loss_history", "NO_DECAY_NAME_PATTERNS"]
