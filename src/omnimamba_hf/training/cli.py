"""`omnimamba-hf train`: the two-stage recipe from the command line.

    omnimamba-hf train --stage stage2 --config run.yaml [--any_field value ...]
    accelerate launch -m omnimamba_hf.training.cli --stage stage2 --config run.yaml      # multi-GPU (DDP / FSDP)
    torchrun --nproc-per-node 8 -m omnimamba_hf.training.cli --stage stage2 --config run.yaml

Every field of `ModelArguments`, `DataArguments` and `OmniMambaTrainingArguments` (all of `TrainingArguments`) can be
set in the YAML file or on the command line (`--help` lists them); stage presets supply the original's
hyper-parameters for whatever is not set. Progress: the Trainer's progress bar and log lines (`loss`, `loss_mmu`,
`loss_t2i`, `grad_norm`, `learning_rate`), also appended as JSON lines to `<output_dir>/train_log.jsonl`; the stage's
trainable/frozen parameter counts are logged and written to `<output_dir>/stage_report.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
from transformers import TrainerCallback

logger = logging.getLogger("omnimamba_hf.training")


class JsonlLogCallback(TrainerCallback):
    """Append every log dict (with its step) to `<output_dir>/train_log.jsonl` on the main process."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _setup_logging(training_args) -> None:
    import datasets
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)]
    )
    logging.getLogger("omnimamba_hf").setLevel(logging.INFO if level <= logging.INFO else level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))


def build_model(model_args, seed: int = 42):
    """Load (or randomly initialise) the model as the model arguments say, with the optional inits."""
    from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration

    from .stages import load_mamba2_text_weights, merge_stage_checkpoints

    dtype = model_args.dtype  # "auto": the checkpoint's dtype (float32 for a random initialisation)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if model_args.model_name_or_path:
        model = OmniMambaForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    elif model_args.config_name:
        name = model_args.config_name
        config = OmniMambaConfig() if name.lower() in ("omnimamba-1.3b", "default") else OmniMambaConfig.from_pretrained(name)
        torch.manual_seed(seed)
        model = OmniMambaForConditionalGeneration(config).to(torch.float32 if dtype == "auto" else dtype)
        logger.info(f"Randomly initialised OmniMamba from {name}.")
    else:
        raise ValueError("Give --model_name_or_path (a checkpoint) or --config_name (random initialisation).")
    if model_args.init_text_from:
        load_mamba2_text_weights(model, model_args.init_text_from)
    sources = {}
    if model_args.stage1_mmu_checkpoint:
        sources["stage1_mmu"] = OmniMambaForConditionalGeneration.from_pretrained(model_args.stage1_mmu_checkpoint)
    if model_args.stage1_t2i_checkpoint:
        sources["stage1_t2i"] = OmniMambaForConditionalGeneration.from_pretrained(model_args.stage1_t2i_checkpoint)
    if sources:
        counts = merge_stage_checkpoints(model, sources)
        logger.info(f"Merged stage-1 results into the starting point: {counts} tensors.")
    return model


def build_processor(model_args, config):
    from transformers import AutoProcessor, AutoTokenizer

    from omnimamba_hf.processing import OmniMambaProcessor

    source = model_args.processor_name_or_path or model_args.model_name_or_path
    if source:
        try:
            return AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            if not model_args.tokenizer_name_or_path:
                raise ValueError(
                    f"No OmniMamba processor could be loaded from {source} ({err}); pass --tokenizer_name_or_path "
                    "(the base GPT-NeoX tokenizer) to build one."
                ) from err
    if not model_args.tokenizer_name_or_path:
        raise ValueError("Give --processor_name_or_path or --tokenizer_name_or_path to build the processor.")
    return OmniMambaProcessor.from_config(config, AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path))


def build_datasets(data_args, training_args, model, processor, split: str = "train"):
    """The `MixedTaskDataset` of a split ("train": `--mmu_data` / `--t2i_data`; "eval": `--eval_mmu_data` /
    `--eval_t2i_data`, None when neither is given), tokenised / validated / VQ-tokenised once; and the MMU format."""
    from .data import (
        MixedTaskDataset,
        load_coco_captions,
        load_llava_dataset,
        load_t2i_dataset,
        prepare_mmu_dataset,
        prepare_t2i_dataset,
        pretokenize_images,
    )
    from .stages import get_stage

    config = model.config
    sizes = training_args.task_batch_sizes
    stage = get_stage(training_args.stage) if training_args.stage else None
    mmu_format = data_args.mmu_format or (stage.mmu_format if stage and stage.mmu_format else "finetune")
    prefix = "" if split == "train" else "eval_"
    mmu_path, t2i_path = getattr(data_args, f"{prefix}mmu_data"), getattr(data_args, f"{prefix}t2i_data")
    # --max_*_samples cut the training data only
    max_mmu, max_t2i = (data_args.max_mmu_samples, data_args.max_t2i_samples) if split == "train" else (None, None)
    if split != "train" and not (mmu_path or t2i_path):
        return None, mmu_format
    mmu = t2i = None
    with training_args.main_process_first(desc=f"{split} dataset preprocessing"):
        if sizes["mmu"] > 0 and (split == "train" or mmu_path):
            if not mmu_path:
                raise ValueError("per_device_mmu_batch_size > 0 but no --mmu_data was given.")
            mmu = load_llava_dataset(mmu_path, cache_dir=data_args.dataset_cache_dir)
            if max_mmu:
                mmu = mmu.select(range(min(max_mmu, len(mmu))))
            mmu = prepare_mmu_dataset(
                mmu,
                processor,
                config,
                mmu_format=mmu_format,
                max_text_length=data_args.max_text_length,
                image_root=data_args.mmu_image_root,
                keep_text_only=data_args.keep_text_only,
                check_image_files=data_args.check_image_files,
                on_bad_record=data_args.on_bad_record,
                num_proc=data_args.preprocessing_num_workers,
            )
        if sizes["t2i"] > 0 and (split == "train" or t2i_path):
            if not t2i_path:
                raise ValueError("per_device_t2i_batch_size > 0 but no --t2i_data was given.")
            if data_args.t2i_image_root:  # COCO captions + images: VQ-tokenise once (cached)
                raw = load_coco_captions(t2i_path, data_args.t2i_image_root)
                if max_t2i:
                    raw = raw.select(range(min(max_t2i, len(raw))))
                vq = model.get_base_model().model.vqmodel if hasattr(model, "get_base_model") else model.model.vqmodel
                device, home = training_args.device, next(vq.parameters()).device
                cache_file = data_args.vq_cache_file
                if cache_file and split != "train":  # the eval split's codes must not overwrite the train split's
                    root, ext = os.path.splitext(cache_file)
                    cache_file = f"{root}.{split}{ext}"
                t2i = pretokenize_images(
                    raw,
                    vq,
                    processor.image_processor,
                    batch_size=data_args.vq_batch_size,
                    device=device,
                    cache_file_name=cache_file,
                    on_bad_record=data_args.on_bad_record,
                )
                vq.to(home)  # the Trainer places the whole model later
            else:
                t2i = load_t2i_dataset(t2i_path)
                if max_t2i:
                    t2i = t2i.select(range(min(max_t2i, len(t2i))))
            t2i = prepare_t2i_dataset(
                t2i, config, on_bad_record=data_args.on_bad_record, num_proc=data_args.preprocessing_num_workers
            )
    policy = data_args.on_bad_record
    return MixedTaskDataset(mmu=mmu, t2i=t2i, image_root=data_args.mmu_image_root, on_bad_record=policy), mmu_format


def _resolve_resume(training_args) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() in ("auto", "last", "latest", "true"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            logger.info(f"No checkpoint in {training_args.output_dir}: starting from scratch.")
        return last
    return value


def train_main(argv: list[str] | None = None) -> int:
    """Run one training stage. Returns 0 on success (the process exit status)."""
    from transformers import set_seed

    from .collators import OmniMambaDataCollator
    from .config import parse_training_args
    from .peft_utils import get_omnimamba_lora_model
    from .trainer_omnimamba import OmniMambaTrainer

    model_args, data_args, training_args = parse_training_args(argv)
    _setup_logging(training_args)
    logger.info(f"Stage {training_args.stage or '(none: requires_grad as loaded)'}; output_dir {training_args.output_dir}")
    set_seed(training_args.seed)

    model = build_model(model_args, seed=training_args.seed)
    processor = build_processor(model_args, model.config)
    if model_args.lora_r > 0:
        model = get_omnimamba_lora_model(
            model,
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=[t.strip() for t in model_args.lora_target_modules.split(",") if t.strip()],
        )

    train_dataset, mmu_format = build_datasets(data_args, training_args, model, processor)
    eval_dataset, _ = build_datasets(data_args, training_args, model, processor, split="eval")
    if eval_dataset is None and training_args.eval_strategy != "no":
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy} needs evaluation data: pass --eval_mmu_data and/or "
            "--eval_t2i_data (same formats as --mmu_data / --t2i_data)."
        )
    base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    collator = OmniMambaDataCollator(
        base_config, processor, mmu_format=mmu_format, max_text_length=data_args.max_text_length, image_root=data_args.mmu_image_root
    )
    trainer = OmniMambaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[JsonlLogCallback()],
    )
    if trainer.stage_report is not None and trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "stage_report.json"), "w", encoding="utf-8") as f:
            json.dump(trainer.stage_report.to_dict(), f, indent=2)

    result = trainer.train(resume_from_checkpoint=_resolve_resume(training_args))
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    return 0


def end_distributed() -> None:
    """Tear torch.distributed's process group down before the interpreter exits. Left to static destructors after a
    torchrun training run, gloo's threads can abort a process that has finished ("terminate called without an active
    exception", SIGABRT), and torchrun then reports the whole run as failed. Call it once, after the last
    `train_main` of a process (the command-line entry points do)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process tears down while another still finishes its last collective
        dist.destroy_process_group()


def train_command(argv: list[str] | None = None) -> int:
    """`omnimamba-hf train ...`: one training stage, then the process group (if any) torn down. (Not on an exception:
    the other processes may be stuck in a collective, and a barrier here would hang this one instead of letting
    torchrun see it fail.)"""
    status = train_main(argv)
    end_distributed()
    return status


def main() -> None:  # `python -m omnimamba_hf.training.cli ...`
    sys.exit(train_command(sys.argv[1:]))


if __name__ == "__main__":
    main()
