"""Building the demo model: the tiny tokenizers (text BPE, VQ) and the paper's decoupled two-stage recipe on the digits.

1. **VQ tokenizer** (`vq_pretrain.train_vq`): the tiny LlamaGen-architecture VQ learns to reconstruct the 8-px digits
   (the released VQ-16 comes pretrained from LlamaGen; the demo's has to be trained first).
2. **Data**, through `omnimamba_hf.training.data` exactly as for real data: T2I images are VQ-tokenised once with
   `pretokenize_images` (`datasets.map`) and validated with `prepare_t2i_dataset`; MMU records (an image + a LLaVA-style
   conversation) are tokenised with `prepare_mmu_dataset` in the stage's format.
3. **Stage 1** (two independent runs from the same random start, as in the paper): `stage1_mmu` aligns the vision
   features (projector + MMU adapter trainable) on image captions, `stage1_t2i` pre-trains generation (image-code
   embeddings and head, T2I position table, caption MLP, text embedding, T2I adapter). The two results are merged
   with `merge_stage_checkpoints` (the original ships no merge script, spec §7.6).
4. **Stage 2** (`stage2`): unified fine-tuning of everything but the vision towers and the VQ, on mixed batches
   (MMU instructions + T2I), with `OmniMambaTrainer`.

The vision towers stay at their random initialisation, frozen in every stage (as the released towers stay frozen at
their pretrained weights): random ViT features of a 32-px digit are informative enough for the trained projector.

The MMU instruction data holds every question twice: in the original's training format (`In: {q}\\nOut: {a}`,
built by the training collator) and in the chat-template format that inference uses (`USER: {q} ASSISTANT: {a}`),
because a tiny model trained from scratch does not transfer from one prompt format to the other the way the
pretrained Mamba-2 LM does (spec §4.3 notes the original's mismatch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from . import data as D
from .tiny import MMU_TEXT_LENGTH, demo_config, demo_processor

logger = logging.getLogger(__name__)

RECIPE_VERSION = 2


@dataclass
class DemoRecipe:
    """Sizes of the demo run. `full()` is the default demo, `quick()` the short run of the CI smoke test."""

    name: str = "full"
    max_train_images: int | None = None  # None: the whole training split (1437 digits)
    max_eval_images: int | None = None  # None: the whole held-out split (360 digits)
    vq_steps: int = 500
    vq_batch_size: int = 64
    vq_learning_rate: float = 2e-3
    stage1_mmu_steps: int = 60
    stage1_mmu_learning_rate: float = 5e-3
    stage1_t2i_steps: int = 300
    stage1_t2i_learning_rate: float = 2e-3
    stage2_steps: int = 600
    stage2_learning_rate: float = 1e-3
    mmu_batch_size: int = 32
    t2i_batch_size: int = 32
    t2i_samples_per_class: int = 20
    seed: int = 0

    @classmethod
    def full(cls) -> DemoRecipe:
        return cls()

    @classmethod
    def quick(cls) -> DemoRecipe:
        return cls(
            name="quick",
            max_eval_images=120,
            vq_steps=200,
            stage1_mmu_steps=30,
            stage1_t2i_steps=80,
            stage2_steps=600,
            stage2_learning_rate=2e-3,
            mmu_batch_size=16,
            t2i_batch_size=16,
            t2i_samples_per_class=5,
        )


# ---- data -------------------------------------------------------------------------------------------------------------


def _mmu_conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def chat_format_text(processor, question: str, answer: str, max_text_length: int) -> tuple[list[int], list[int]]:
    """The text part of an MMU training sample in the inference (chat-template) format: ids of
    `USER: {q} ASSISTANT: {a}<|endoftext|>` as `processor.apply_chat_template` renders it, labels on ` {a}<|endoftext|>`
    only, then `<|eot|>` (label -100) and `[PAD]` / -100 to `max_text_length` (the layout of the training collator)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True)
    full = processor.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    if not full.startswith(prompt):
        raise ValueError(f"The chat template renders the answer differently from the prompt: {prompt!r} / {full!r}.")
    text = prompt.split("<|sot|>", 1)[1]
    tok = processor.tokenizer
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids + [processor.token_ids["eot_token_id"]]
    labels = [-100] * len(prompt_ids) + answer_ids + [-100]
    if len(ids) > max_text_length:
        raise ValueError(f"{text!r} + {answer!r} is longer than max_text_length={max_text_length}.")
    pad = max_text_length - len(ids)
    return ids + [processor.token_ids["pad_token_id"]] * pad, labels + [-100] * pad


def build_datasets(split: D.DigitsSplit, processor, config, vq, seed: int = 0):
    """`{"align": MMU captions, "instruct": MMU questions (both formats), "t2i": VQ codes + captions}` as
    `datasets.Dataset`s prepared by the training package."""
    import datasets

    from omnimamba_hf.training import pretokenize_images, prepare_mmu_dataset, prepare_t2i_dataset

    vision_size = config.vision_config.image_size
    images = D.render(split.train_images, vision_size)
    labels = [int(x) for x in split.train_labels]
    words = [D.answer_for(y) for y in labels]

    align = datasets.Dataset.from_dict(
        {
            "image": images,
            "conversations": [_mmu_conversation("Describe the image.", D.ALIGN_TEMPLATE.format(w)) for w in words],
        }
    )
    align = prepare_mmu_dataset(align, processor, config, mmu_format="align", max_text_length=MMU_TEXT_LENGTH)

    # Stage-2 instructions: every image once per format, the question cycling through the paraphrases.
    questions = [D.TRAIN_QUESTIONS[i % len(D.TRAIN_QUESTIONS)] for i in range(len(images))]
    conversations = [_mmu_conversation(q, w) for q, w in zip(questions, words)]
    original = datasets.Dataset.from_dict({"image": images, "conversations": conversations})
    original = prepare_mmu_dataset(original, processor, config, mmu_format="finetune", max_text_length=MMU_TEXT_LENGTH)
    chat_rows = [chat_format_text(processor, q, w, MMU_TEXT_LENGTH) for q, w in zip(questions[::-1], words)]
    chat = datasets.Dataset.from_dict(
        {
            "image": images,
            "conversations": [_mmu_conversation(q, w) for q, w in zip(questions[::-1], words)],
            "input_ids": [r[0] for r in chat_rows],
            "labels": [r[1] for r in chat_rows],
            "mmu_format": ["finetune"] * len(chat_rows),  # pre-tokenised here; collated with the stage-2 collator
        },
        features=original.features,
    )
    instruct = datasets.concatenate_datasets([original, chat]).shuffle(seed=seed)

    vq_images = D.render(split.train_images, config.vq_config.image_size)
    t2i = datasets.Dataset.from_dict({"image": vq_images, "captions": [D.captions_for(y) for y in labels]})
    t2i = pretokenize_images(t2i, vq, processor.image_processor, batch_size=256)
    t2i = prepare_t2i_dataset(t2i, config)
    return {"align": align, "instruct": instruct, "t2i": t2i}


# ---- stages -----------------------------------------------------------------------------------------------------------


def run_stage(model, stage: str, processor, mmu=None, t2i=None, *, steps: int, learning_rate: float,
              mmu_batch_size: int = 0, t2i_batch_size: int = 0, output_dir: str, seed: int = 0,
              progress: bool = True, log_file: str | None = None) -> dict:  # fmt: skip
    """One stage of the recipe with `OmniMambaTrainer`: the stage preset (what is trainable, the original's optimiser
    settings: AdamW betas 0.9/0.95, no weight decay, cosine to 1 % of the peak, gradient clipping 1.0) with the demo's
    step counts, learning rates and batch sizes, in float32 on the CPU (or the GPU if there is one)."""
    from transformers import TrainerCallback

    from omnimamba_hf.training import (
        MixedTaskDataset,
        OmniMambaDataCollator,
        OmniMambaTrainer,
        OmniMambaTrainingArguments,
        get_stage,
        stage_training_defaults,
        task_loss_history,
    )

    preset = get_stage(stage)
    settings = stage_training_defaults(stage)
    for key in ("tf32", "bf16", "save_steps", "save_total_limit", "logging_steps", "max_steps", "warmup_steps"):
        settings.pop(key, None)
    settings.update(
        per_device_mmu_batch_size=mmu_batch_size if "mmu" in preset.tasks else 0,
        per_device_t2i_batch_size=t2i_batch_size if "t2i" in preset.tasks else 0,
        learning_rate=learning_rate,
    )
    args = OmniMambaTrainingArguments(
        output_dir=output_dir,
        stage=stage,
        max_steps=steps,
        warmup_steps=max(1, steps // 20),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
        seed=seed,
        data_seed=seed,
        **settings,
    )

    class _Log(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kwargs):
            if log_file and logs:
                with open(log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"stage": stage, "step": state.global_step, **logs}) + "\n")

    collator = OmniMambaDataCollator(
        model.config, processor, mmu_format=preset.mmu_format or "finetune", max_text_length=MMU_TEXT_LENGTH
    )
    dataset = MixedTaskDataset(mmu=mmu if "mmu" in preset.tasks else None, t2i=t2i if "t2i" in preset.tasks else None)
    trainer = OmniMambaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[_Log()],
    )
    if not progress:  # the Trainer prints every log dict when its progress bar is off
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.time()
    result = trainer.train()
    history = task_loss_history(trainer.state.log_history)
    last = {k: v[-1] for k, v in history.items() if v and v[-1] == v[-1]}  # drop NaN (task absent)
    return {
        "stage": stage,
        "steps": steps,
        "seconds": round(time.time() - start, 1),
        "train_loss": round(result.training_loss, 4),
        "last_logged": last,
        "trainable_parameters": trainer.stage_report.trainable if trainer.stage_report else None,
    }


def train_demo_model(output_dir: str, recipe: DemoRecipe | None = None, progress: bool = True) -> dict:
    """Train the demo model from scratch and save it (`save_pretrained` of the model and the processor) to
    `output_dir`, written to a temporary sibling and moved into place when complete. Returns the training report."""
    recipe = recipe or DemoRecipe.full()
    with _library_verbosity(progress):
        return _train(output_dir, recipe, progress)


@contextlib.contextmanager
def _library_verbosity(progress: bool):
    """Less chatter from transformers / datasets / the training package while the demo trains (restored after)."""
    import datasets
    from transformers.utils import logging as hf_logging

    saved = (hf_logging.get_verbosity(), datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled(),
             logging.getLogger("omnimamba_hf").level)  # fmt: skip
    hf_logging.set_verbosity_warning() if progress else hf_logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if not progress:
        datasets.disable_progress_bars()
    logging.getLogger("omnimamba_hf").setLevel(logging.WARNING)
    try:
        yield
    finally:
        hf_logging.set_verbosity(saved[0])
        datasets.logging.set_verbosity(saved[1])
        datasets.enable_progress_bars() if saved[2] else datasets.disable_progress_bars()
        logging.getLogger("omnimamba_hf").setLevel(saved[3])


def _train(output_dir: str, recipe: DemoRecipe, progress: bool) -> dict:
    import shutil
    import tempfile

    from transformers import set_seed

    from omnimamba_hf import OmniMambaForConditionalGeneration
    from omnimamba_hf.training import merge_stage_checkpoints

    from .vq_pretrain import codebook_usage, train_vq

    t0 = time.time()
    report: dict = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "stages": []}
    split = D.load_split().subset(recipe.max_train_images, recipe.max_eval_images)
    set_seed(recipe.seed)
    config = demo_config()
    processor = demo_processor(config)
    model = OmniMambaForConditionalGeneration(config).eval()
    with torch.no_grad():  # as in the original layout: timm's DINOv2 has no class position and no mask token
        dino = model.model.vision_model.dino.embeddings
        dino.position_embeddings[:, 0].zero_()
        dino.mask_token.zero_()
    report["parameters"] = {
        name: sum(p.numel() for p in module.parameters()) for name, module in model.model.named_children()
    }
    report["parameters"]["total"] = sum(p.numel() for p in model.parameters())

    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        log_file = os.path.join(work, "train_log.jsonl")
        # 1. VQ tokenizer
        vq = model.model.vqmodel
        vq_pixels = processor.image_processor.preprocess_for_vq(
            D.render(split.train_images, config.vq_config.image_size), config.vq_config.image_size
        )
        start = time.time()
        vq_report = train_vq(
            vq, vq_pixels, steps=recipe.vq_steps, batch_size=recipe.vq_batch_size,
            learning_rate=recipe.vq_learning_rate, seed=recipe.seed, progress=progress,
        )  # fmt: skip
        vq_report.update(seconds=round(time.time() - start, 1), codes_used=codebook_usage(vq, vq_pixels))
        report["vq"] = vq_report
        _say(progress, f"VQ tokenizer: reconstruction MSE {vq_report['reconstruction_mse']:.4f}, "
                       f"{vq_report['codes_used']}/{config.image_vocab_size} codes used ({vq_report['seconds']} s)")  # fmt: skip

        # 2. data
        start = time.time()
        sets = build_datasets(split, processor, config, vq, seed=recipe.seed)
        report["data"] = {k: len(v) for k, v in sets.items()} | {"seconds": round(time.time() - start, 1)}

        # 3. stage 1: two runs from the same start, merged
        common = dict(mmu_batch_size=recipe.mmu_batch_size, t2i_batch_size=recipe.t2i_batch_size, seed=recipe.seed,
                      progress=progress, log_file=log_file)  # fmt: skip
        stage1_mmu = copy.deepcopy(model)
        _say(progress, "Stage 1 (MMU alignment): projector + MMU adapter")
        report["stages"].append(run_stage(
            stage1_mmu, "stage1_mmu", processor, mmu=sets["align"], steps=recipe.stage1_mmu_steps,
            learning_rate=recipe.stage1_mmu_learning_rate, output_dir=os.path.join(work, "stage1_mmu"), **common,
        ))  # fmt: skip
        stage1_t2i = copy.deepcopy(model)
        _say(progress, "Stage 1 (T2I pre-training): image embeddings/head, caption MLP, T2I positions, T2I adapter")
        report["stages"].append(run_stage(
            stage1_t2i, "stage1_t2i", processor, t2i=sets["t2i"], steps=recipe.stage1_t2i_steps,
            learning_rate=recipe.stage1_t2i_learning_rate, output_dir=os.path.join(work, "stage1_t2i"), **common,
        ))  # fmt: skip
        report["merged"] = merge_stage_checkpoints(model, {"stage1_mmu": stage1_mmu, "stage1_t2i": stage1_t2i})
        del stage1_mmu, stage1_t2i

        # 4. stage 2: unified fine-tuning on mixed batches
        _say(progress, "Stage 2 (unified fine-tuning): MMU instructions + T2I, everything but the towers and the VQ")
        report["stages"].append(run_stage(
            model, "stage2", processor, mmu=sets["instruct"], t2i=sets["t2i"], steps=recipe.stage2_steps,
            learning_rate=recipe.stage2_learning_rate, output_dir=os.path.join(work, "stage2"), **common,
        ))  # fmt: skip
        model.eval()
        model.requires_grad_(False)
        report["training_seconds"] = round(time.time() - t0, 1)

        # 5. save: a normal save_pretrained directory (+ the demo's own notes)
        model_dir = os.path.join(work, "model")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        with open(os.path.join(model_dir, "demo_info.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        _write_model_card(model_dir, report)
        for stage_dir in ("stage1_mmu", "stage1_t2i", "stage2"):
            shutil.rmtree(os.path.join(work, stage_dir), ignore_errors=True)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[omnimamba-hf demo] {message}", flush=True)


def _write_model_card(model_dir: str, report: dict) -> None:
    stages = "\n".join(f"| {s['stage']} | {s['steps']} | {s['train_loss']} | {s['seconds']} |" for s in report["stages"])
    text = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: mit
tags: [omnimamba, mamba2, demo, arxiv:2503.08686]
---

# OmniMamba demo model (tiny, scikit-learn digits)

Built by `omnimamba-hf demo` (recipe `{report['recipe']['name']}`): a {report['parameters']['total']:,}-parameter
OmniMamba (same architecture as the released 1.3B model at toy width) trained from scratch on CPU on the 1437
training digits of `sklearn.datasets.load_digits`. It answers "What digit is this?" about a digit image and draws a
digit from "a handwritten seven". It is a demonstration of the code paths, not a useful model.

| stage | steps | mean train loss | seconds |
|---|---|---|---|
{stages}

```python
import omnimamba_hf  # registers the Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
```
"""
    with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


__all__ = ["DemoRecipe", "RECIPE_VERSION", "build_datasets", "chat_format_text", "run_stage", "train_demo_model"]
