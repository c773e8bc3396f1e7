"""Training OmniMamba with 🤗 Trainer, datasets and PEFT: the decoupled two-stage recipe of the paper (ORIGINAL-SPEC §7).

    from omnimamba_hf.training import (
        OmniMambaTrainer, OmniMambaTrainingArguments, OmniMambaDataCollator, MixedTaskDataset,
        load_llava_dataset, prepare_mmu_dataset, load_t2i_dataset, prepare_t2i_dataset,
    )
    args = OmniMambaTrainingArguments(output_dir="out", stage="stage2", bf16=True)   # 3 MMU + 48 T2I per device
    mmu = prepare_mmu_dataset(load_llava_dataset("mix1231k.json"), processor, model.config, image_root="llava/")
    t2i = prepare_t2i_dataset(load_t2i_dataset("pretokenized_coco_train2014.jsonl"), model.config)
    trainer = OmniMambaTrainer(model, args, train_dataset=MixedTaskDataset(mmu, t2i, image_root="llava/"),
                               processing_class=processor)
    trainer.train()

See docs/TRAINING.md.
"""

from .collators import (
    IGNORE_INDEX,
    BadRecordError,
    OmniMambaDataCollator,
    OmniMambaMMUCollator,
    OmniMambaT2ICollator,
    SequenceSpec,
    build_align_text,
    build_finetune_text,
    build_mmu_example,
    build_t2i_example,
    build_t2i_prompt,
)
from .config import DataArguments, ModelArguments, OmniMambaTrainingArguments, load_yaml_config, parse_training_args
from .data import (
    MixedTaskBatchSampler,
    MixedTaskDataset,
    load_coco_captions,
    load_llava_dataset,
    load_t2i_dataset,
    prepare_mmu_dataset,
    prepare_t2i_dataset,
    pretokenize_images,
)
from .peft_utils import (
    export_task_adapters,
    get_omnimamba_lora_model,
    import_task_adapters,
    load_omnimamba_lora,
    neutralize_task_adapters,
)
from .stages import (
    STAGES,
    StagePreset,
    StageReport,
    apply_stage,
    get_stage,
    load_mamba2_text_weights,
    merge_stage_checkpoints,
    parameter_report,
    stage_training_defaults,
)
from .trainer_omnimamba import OmniMambaTrainer, task_loss_history


def train_main(argv=None) -> int:
    """`omnimamba-hf train ...` (see `omnimamba_hf.training.cli`)."""
    from .cli import train_main as _train_main

    return _train_main(argv)


__all__ = [
    "IGNORE_INDEX",
    "BadRecordError",
    "DataArguments",
    "MixedTaskBatchSampler",
    "MixedTaskDataset",
    "ModelArguments",
    "OmniMambaDataCollator",
    "OmniMambaMMUCollator",
    "OmniMambaT2ICollator",
    "OmniMambaTrainer",
    "OmniMambaTrainingArguments",
    "STAGES",
    "SequenceSpec",
    "StagePreset",
    "StageReport",
    "apply_stage",
    "build_align_text",
    "build_finetune_text",
    "build_mmu_example",
    "build_t2i_example",
    "build_t2i_prompt",
    "export_task_adapters",
    "get_omnimamba_lora_model",
    "get_stage",
    "import_task_adapters",
    "load_coco_captions",
    "load_llava_dataset",
    "load_mamba2_text_weights",
    "load_omnimamba_lora",
    "load_t2i_dataset",
    "load_yaml_config",
    "merge_stage_checkpoints",
    "neutralize_task_adapters",
    "parameter_report",
    "parse_training_args",
    "prepare_mmu_dataset",
    "prepare_t2i_dataset",
    "pretokenize_images",
    "stage_training_defaults",
    "task_loss_history",
    "train_main",
]
