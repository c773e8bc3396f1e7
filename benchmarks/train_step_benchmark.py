"""Time stage-2 training steps of OmniMamba through `OmniMambaTrainer` on random weights and a synthetic batch.

Full size (the released 1.3B layout, 48 T2I + 3 MMU per device, bf16 autocast, fp32 master weights as the original's
`accelerate --mixed_precision=bf16`), on the GPU with the mamba-ssm / causal-conv1d kernels when installed:

    python benchmarks/train_step_benchmark.py --steps 20 --warmup 3 --output results/train_step.json
    python benchmarks/train_step_benchmark.py --activation-checkpointing          # recompute each Mamba block
    python benchmarks/train_step_benchmark.py --tiny --steps 2 --warmup 1         # CPU smoke test (used by the tests)

Reports steps/s, samples/s, tokens/s, the per-task losses and the peak GPU memory (allocated and reserved), as JSON
(stdout and `--output`). A run that does not fit without activation checkpointing is retried with it (reported as
`oom_without_activation_checkpointing`; `--on-oom fail` to stop instead). The batch goes through the real collator and Trainer step: two forwards (T2I 329 ids, MMU
4 + 729 + 449 = 1182 ids), one backward, AdamW (betas 0.9/0.95), grad-norm clipping 1.0, cosine-with-min-lr schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

try:
    import omnimamba_hf  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from transformers import TrainerCallback

from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
from omnimamba_hf.processing.tokenization_omnimamba import token_ids_for_base_vocab
from omnimamba_hf.modeling.mixer_omnimamba import mamba_kernels
from omnimamba_hf.processing import OmniMambaImageProcessor
from omnimamba_hf.training import (
    MixedTaskDataset,
    OmniMambaDataCollator,
    OmniMambaTrainer,
    OmniMambaTrainingArguments,
    task_loss_history,
)


def tiny_config() -> OmniMambaConfig:
    """The test-suite's tiny layout (2 Mamba layers of width 32, 28-px towers, 4×4-token VQ)."""
    ids = token_ids_for_base_vocab(300)
    text_vocab = ids.pop("text_vocab_size")
    for unused in ("soc_token_id", "eoc_token_id", "lvg_token_id"):
        ids.pop(unused)
    return OmniMambaConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 16, "state_size": 8,
                     "chunk_size": 8, "vocab_size": text_vocab, "pad_token_id": ids["pad_token_id"]},
        vision_config={
            "dino_config": {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
            "siglip_config": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2,
                              "image_size": 28, "patch_size": 14},
        },
        vq_config={"embed_dim": 4, "num_embeddings": 64, "latent_channels": 16, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "num_patches": 4, "image_size": 8},
        projector_intermediate_size=48,
        image_embedding_intermediate_size=48,
        num_image_tokens=4,
        mmu_max_position_embeddings=64,
        t2i_caption_length=6,
        t2i_max_position_embeddings=27,
        **ids,
    )  # fmt: skip


def synthetic_records(config: OmniMambaConfig, n_mmu: int, n_t2i: int, max_text_length: int, seed: int = 0):
    """Pre-tokenised MMU records (random prompt/answer ids in the 449-id text layout, random RGB images at the towers'
    size) and T2I records (random caption ids, random VQ codes)."""
    rng = np.random.default_rng(seed)
    n_text = config.pad_token_id  # ordinary GPT-NeoX ids lie below [PAD]
    size = config.vision_config.image_size
    mmu = []
    for _ in range(n_mmu):
        prompt = int(rng.integers(8, max(9, max_text_length // 8)))
        answer = int(rng.integers(max_text_length // 4, max_text_length - prompt - 1))
        text = rng.integers(1, n_text, prompt + answer).tolist()
        ids = text + [config.eot_token_id]
        labels = [-100] * prompt + text[prompt:] + [-100]
        image = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        mmu.append({"image": image, "input_ids": ids, "labels": labels})
    t2i = []
    for _ in range(n_t2i):
        caption = rng.integers(1, n_text, int(rng.integers(1, config.t2i_caption_length + 1))).tolist()
        codes = rng.integers(0, config.image_vocab_size, config.num_generated_image_tokens).tolist()
        t2i.append({"caption_ids": caption, "tokens": codes})
    return mmu, t2i


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step (device-synchronised) and the peak device memory after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.start = warmup, [], None
        self.timed_start = self.timed_end = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()
        if state.global_step == self.warmup:
            self.timed_start = self.start
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if state.global_step > self.warmup:
            self.times.append(now - self.start)
            self.timed_end = now


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel autotuning, allocator)")
    p.add_argument("--mmu-batch", type=int, default=None, help="MMU samples per step (default 3; tiny 2)")
    p.add_argument("--t2i-batch", type=int, default=None, help="T2I samples per step (default 48; tiny 4)")
    p.add_argument("--stage", default="stage2", help="stage preset (stage2 trains everything but the towers and VQ)")
    p.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast (CPU runs are always fp32)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each Mamba block in backward")
    p.add_argument("--torch-compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--on-oom", choices=["retry", "fail"], default="retry",
                   help="retry: after an out-of-memory without activation checkpointing, rerun with it (default)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the JSON result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = tiny_config() if args.tiny else OmniMambaConfig()
    mmu_batch = args.mmu_batch if args.mmu_batch is not None else (2 if args.tiny else 3)
    t2i_batch = args.t2i_batch if args.t2i_batch is not None else (4 if args.tiny else 48)
    max_text_length = 24 if args.tiny else 449
    total_steps = args.warmup + args.steps
    bf16 = not args.no_bf16 and cuda and torch.cuda.is_bf16_supported()  # CPU (smoke test): fp32

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):  # random init directly on the device (the full model has 2.3B parameters)
        model = OmniMambaForConditionalGeneration(config)
    init_s = time.perf_counter() - t0

    # enough records that every timed step sees new samples
    mmu, t2i = synthetic_records(config, max(mmu_batch * total_steps, mmu_batch), max(t2i_batch * 2, t2i_batch), max_text_length, args.seed)
    dataset = MixedTaskDataset(mmu=mmu if mmu_batch else None, t2i=t2i if t2i_batch else None)
    image_processor = OmniMambaImageProcessor.from_model_config(config)
    collator = OmniMambaDataCollator(config, image_processor=image_processor, max_text_length=max_text_length)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)

    def run(checkpointing: bool):
        """One timed Trainer run; None when it runs out of GPU memory (everything it allocated is released)."""
        timer = StepTimer(args.warmup)
        with tempfile.TemporaryDirectory() as out_dir:
            training_args = OmniMambaTrainingArguments(
                output_dir=out_dir,
                stage=args.stage,
                per_device_mmu_batch_size=mmu_batch,
                per_device_t2i_batch_size=t2i_batch,
                max_steps=total_steps,
                learning_rate=args.learning_rate,
                adam_beta2=0.95,
                lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": 0.01},
                bf16=bf16,
                tf32=cuda,
                activation_checkpointing=checkpointing,
                torch_compile=args.torch_compile,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                dataloader_num_workers=workers,
                dataloader_pin_memory=cuda,
                disable_tqdm=True,
                use_cpu=not cuda,
                seed=args.seed,
            )
            trainer = OmniMambaTrainer(model, training_args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
            try:
                trainer.train()
            except torch.cuda.OutOfMemoryError as err:
                print(f"out of GPU memory (activation_checkpointing={checkpointing}): {str(err)[:200]}", file=sys.stderr)
                oom = True
            else:
                oom = False
            history = task_loss_history(trainer.state.log_history)
            report = trainer.stage_report
            trainer.optimizer = trainer.lr_scheduler = None
            del trainer
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.activation_checkpointing_disable()
        if cuda:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        return None if oom else (timer, history, report)

    checkpointing = args.activation_checkpointing
    oom_without_checkpointing = None
    outcome = run(checkpointing)
    if outcome is None and not checkpointing and args.on_oom == "retry":
        oom_without_checkpointing = True
        checkpointing = True
        outcome = run(True)
    if outcome is None:
        raise SystemExit("Out of GPU memory; lower --t2i-batch / --mmu-batch.")
    timer, history, report = outcome
    times = timer.times
    tokens_per_step = mmu_batch * (4 + config.num_image_tokens + max_text_length) + t2i_batch * (
        config.t2i_caption_length + 5 + config.num_generated_image_tokens
    )
    mean = statistics.fmean(times) if times else float("nan")
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "config": "tiny" if args.tiny else "OmniMamba-1.3B (released layout, random weights)",
        "kernels": mamba_kernels() is not None if cuda else False,
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
        "activation_checkpointing": checkpointing,
        "oom_without_activation_checkpointing": oom_without_checkpointing,
        "torch_compile": args.torch_compile,
        "stage": args.stage,
        "batch_per_step": {"mmu": mmu_batch, "t2i": t2i_batch},
        "tokens_per_step": tokens_per_step,
        "parameters": {"total": report.trainable + report.frozen, "trainable": report.trainable},
        "init_seconds": round(init_s, 2),
        "timed_steps": len(times),
        "seconds_per_step_mean": round(mean, 4),
        "seconds_per_step_median": round(statistics.median(times), 4) if times else None,
        "steps_per_second": round(1 / mean, 4) if times else None,
        "samples_per_second": round((mmu_batch + t2i_batch) / mean, 2) if times else None,
        "tokens_per_second": round(tokens_per_step / mean, 1) if times else None,
        "wall_steps_per_second_incl_data": (
            round(len(times) / (timer.timed_end - timer.timed_start), 4) if times and timer.timed_start else None
        ),
        "peak_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "loss": history["loss"],
        "loss_mmu": history["loss_mmu"],
        "loss_t2i": history["loss_t2i"],
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
