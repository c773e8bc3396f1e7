r"""Multi-process stage-2 training vs one process with the same global batch: loss trajectory, steps/s, peak memory.

Runs `OmniMambaTrainer` (stage 2, the real collator, AdamW, clipping) on identical synthetic data twice:

* the **multi leg**: N processes (`accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml`, or torchrun),
  each with the per-device batch (default 3 MMU + 48 T2I), i.e. a global batch of N × that;
* the **single leg**: one process with the same global batch, as
  `accumulate` — the per-device batch with N gradient-accumulation micro-batches (fits on one GPU; reads exactly the
  sampler batches that the N processes read, in one step), and/or
  `concat` — one micro-batch of N × the per-device batch (the literal "same global batch"; needs N × the memory);

and compares per step `loss`, `loss_mmu`, `loss_t2i` and `grad_norm` (relative tolerance `--rtol`), checks that every
step consumed the same samples (the union over processes equals the single leg's step), and reports steps/s,
samples/s, the scaling efficiency and the peak memory of every process, as JSON (stdout and `--output`).

    # GPU host, N GPUs (docs/MULTI_GPU.md): DDP, then FSDP against the same single-GPU reference
    python benchmarks/multi_gpu_parity.py --nproc 2 --steps 24 --activation-checkpointing --output results/ddp.json
    python benchmarks/multi_gpu_parity.py --nproc 2 --steps 24 --activation-checkpointing --strategy fsdp \
        --reuse-single results/ddp.json --output results/fsdp.json
    # CPU smoke test (2 gloo processes through the same accelerate config), what tests/test_distributed.py runs
    python benchmarks/multi_gpu_parity.py --tiny --nproc 2 --steps 4 --references accumulate,concat

Exact equality needs what makes the two legs compute the same numbers, so the synthetic data and model are set up
for it (all of it reported in the JSON):

* the task adapters' dropout is 0 (`--dropout`; with dropout the legs draw different masks);
* every MMU sample supervises the same number of answer tokens (`--variable-mmu-answers` lifts this). Each process
  takes the token mean of its own MMU loss and DDP averages those means, as the original did on its 8 GPUs: the
  `concat` reference is a token mean over the whole global batch, which differs when the processes supervise
  different numbers of tokens (`accumulate` has the per-device semantics and always matches);
* T2I records carry `caption_ids` (the sampler's per-sample draw picks nothing), and the record counts are multiples of
  the global batch (no stream restarts in the middle of a global batch).

Steps/s on a shared CPU mean nothing; on GPUs the first `--warmup` steps (Triton autotuning) are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I_UID_OFFSET = 10_000_000  # uids: MMU row i -> i, T2I row j -> T2I_UID_OFFSET + j
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU, gloo), for the test-suite")
    p.add_argument("--nproc", type=int, default=None, help="processes of the multi leg (default: all GPUs; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per leg (default 24; tiny 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    p.add_argument("--mmu-batch", type=int, default=None, help="MMU samples per device and micro-batch (3; tiny 2)")
    p.add_argument("--t2i-batch", type=int, default=None, help="T2I samples per device and micro-batch (48; tiny 4)")
    p.add_argument("--references", default=None,
                   help="single-process references, comma-separated: accumulate, concat, none (default accumulate; "
                        "tiny accumulate,concat)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="configs/accelerate/<strategy>.yaml")
    p.add_argument("--launcher", choices=["accelerate", "torchrun"], default="accelerate",
                   help="accelerate launch with configs/accelerate/<strategy>.yaml (default; on a CPU-only machine it "
                        "runs gloo processes, as the Trainer is told use_cpu), or torchrun (DDP only)")
    p.add_argument("--accelerate-config", default=None, help="overrides configs/accelerate/<strategy>.yaml")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each Mamba block (DDP; the FSDP config checkpoints by itself)")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on GPUs too (CPU runs are fp32)")
    p.add_argument("--dropout", type=float, default=0.0, help="task-adapter dropout (0: deterministic comparison)")
    p.add_argument("--variable-mmu-answers", action="store_true",
                   help="random MMU answer lengths: shows the per-device token-mean effect on the concat reference")
    p.add_argument("--config", default=None, help="an OmniMambaConfig (dir or config.json) instead of the built-in one")
    p.add_argument("--learning-rate", type=float, default=None, help="constant LR (default 1e-4, stage 2's; tiny 3e-3)")
    p.add_argument("--rtol", type=float, default=None, help="pass tolerance (default 1e-5 in fp32; bf16: 5e-3 DDP, 2e-2 FSDP)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-single", default=None,
                   help="take the single-process legs from an earlier result JSON of this script (same data, steps "
                        "and batch) instead of running them again, e.g. FSDP against the DDP run's reference")
    p.add_argument("--single-only", action="store_true",
                   help="run only the single-process legs (to split a long run: then --reuse-single this output)")
    p.add_argument("--timeout", type=int, default=3000, help="seconds per leg")
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--leg", choices=["single", "multi"], default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--leg-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)  # N as seen by the single leg
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    defaults = dict(steps=4, warmup=1, mmu_batch=2, t2i_batch=4, learning_rate=3e-3) if args.tiny else dict(
        steps=24, warmup=3, mmu_batch=3, t2i_batch=48, learning_rate=1e-4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nproc is None:
        args.nproc = 2 if args.tiny or not cuda else max(torch.cuda.device_count(), 1)
    if args.references is None:
        args.references = "accumulate,concat" if args.tiny else "accumulate"
    args.references = [r for r in (x.strip() for x in args.references.split(",")) if r and r != "none"]
    if any(r not in ("accumulate", "concat") for r in args.references):
        raise SystemExit(f"--references: accumulate, concat or none, got {args.references}")
    args.bf16 = cuda and not args.no_bf16 and torch.cuda.is_bf16_supported()
    if args.rtol is None:  # bf16: provisional bounds, to be revised with the first GPU numbers (docs/MULTI_GPU.md)
        args.rtol = (2e-2 if args.strategy == "fsdp" else 5e-3) if args.bf16 else 1e-5
    if args.num_workers is None:
        args.num_workers = 4 if cuda else 0
    if args.single_only and (args.reuse_single or not args.references):
        raise SystemExit("--single-only runs the --references legs: give some, and no --reuse-single.")
    if args.strategy == "fsdp" and args.launcher == "torchrun":
        raise SystemExit("--strategy fsdp needs --launcher accelerate (the settings are in configs/accelerate/fsdp.yaml).")
    return args


# ---- model, data ----------------------------------------------------------------------------------------------------


def build_config(args):
    from omnimamba_hf import OmniMambaConfig

    if args.config:
        config = OmniMambaConfig.from_pretrained(args.config)
    elif args.tiny:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from train_step_benchmark import tiny_config

        config = tiny_config()
    else:
        config = OmniMambaConfig()  # the released 1.3B layout
    config.task_lora_dropout = args.dropout
    return config


def max_text_length(config) -> int:
    """449 (the original) when the MMU position table allows it, else what fits (tiny layouts)."""
    room = config.mmu_max_position_embeddings - 4 - config.num_image_tokens
    return 449 if room >= 449 else min(room, 24)


class LazyRecords:
    """`n` synthetic records, each generated on access from `(seed, task, index)` alone (no 384-px images held)."""

    def __init__(self, n: int, make, seed: int, task: int):
        self.n, self.make, self.seed, self.task = n, make, seed, task

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(np.random.default_rng([self.seed, self.task, i]), i)


def synthetic_datasets(config, n_mmu: int, n_t2i: int, text_length: int, seed: int = 0, variable_answers: bool = False):
    """MMU records (random RGB image, pre-tokenised prompt + answer; the answer length fixed at half the text part
    unless `variable_answers`) and T2I records (random caption ids, random VQ codes), each with a `uid`."""
    import PIL.Image

    n_text = config.pad_token_id  # ordinary GPT-NeoX ids lie below [PAD]
    size = config.vision_config.image_size
    fixed_answer = text_length // 2

    def mmu(rng, i):
        answer = int(rng.integers(2, text_length - 4)) if variable_answers else fixed_answer
        prompt = int(rng.integers(1, text_length - answer))  # prompt + answer + <|eot|> <= text_length
        text = rng.integers(1, n_text, prompt + answer).tolist()
        image = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype="uint8"))
        labels = [-100] * prompt + text[prompt:] + [-100]
        return {"uid": i, "image": image, "input_ids": text + [config.eot_token_id], "labels": labels}

    def t2i(rng, i):
        caption = rng.integers(1, n_text, int(rng.integers(1, config.t2i_caption_length + 1))).tolist()
        codes = rng.integers(0, config.image_vocab_size, config.num_generated_image_tokens).tolist()
        return {"uid": T2I_UID_OFFSET + i, "caption_ids": caption, "tokens": codes}

    return LazyRecords(n_mmu, mmu, seed, 0), LazyRecords(n_t2i, t2i, seed, 1)


def image_processor_for(config):
    from omnimamba_hf.processing import OmniMambaImageProcessor

    return OmniMambaImageProcessor.from_model_config(config)


class UidCollator:
    """The real `OmniMambaDataCollator`, plus `_uids` (which samples the batch holds) for the bookkeeping."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, records):
        import torch

        out = self.collator(records)
        out["_uids"] = torch.tensor([int(r["uid"]) for r in records], dtype=torch.long)
        return out


def make_trainer_class():
    from omnimamba_hf.training import OmniMambaTrainer

    class RecordingTrainer(OmniMambaTrainer):
        """`OmniMambaTrainer` that notes the sample uids of every training micro-batch (and optionally keeps the
        collated inputs); the loss and everything else are the parent's."""

        keep_inputs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            uids = inputs.pop("_uids", None)
            if model.training and uids is not None:
                self.__dict__.setdefault("seen_uids", []).append(sorted(int(u) for u in uids))
                if self.keep_inputs:
                    kept = {t: {k: v.detach().cpu().clone() for k, v in sub.items()} for t, sub in inputs.items()}
                    self.__dict__.setdefault("seen_inputs", []).append(kept)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return RecordingTrainer


def make_step_timer():
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Device-synchronised wall time of every optimiser step; the peak memory after the warm-up steps."""

        def __init__(self, warmup: int):
            self.warmup, self.times, self.start = warmup, [], None

        @staticmethod
        def _sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.start = time.perf_counter()
            if state.global_step == self.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer


# ---- one leg --------------------------------------------------------------------------------------------------------


def run_trainer(args, config, *, world: int, mmu_batch: int, t2i_batch: int, accumulation: int, out_dir: str,
                callbacks=(), keep_inputs: bool = False, model=None, **overrides):
    """Train `args.steps` stage-2 steps on the synthetic data of a global batch `world × accumulation × (mmu, t2i)`
    (`overrides`: further `OmniMambaTrainingArguments`). Returns the trainer (its state, `seen_uids`, `seen_inputs`
    with `keep_inputs`, the timer in `trainer.step_timer`)."""
    import torch

    from omnimamba_hf import OmniMambaForConditionalGeneration
    from omnimamba_hf.training import MixedTaskDataset, OmniMambaDataCollator, OmniMambaTrainingArguments

    cuda = torch.cuda.is_available()
    per_step = world * accumulation  # micro-batches of (mmu_batch, t2i_batch) per optimiser step, all processes
    text_length = max_text_length(config)
    mmu, t2i = synthetic_datasets(
        config, per_step * mmu_batch * args.steps, per_step * t2i_batch * args.steps, text_length, args.seed,
        args.variable_mmu_answers,
    )  # fmt: skip
    dataset = MixedTaskDataset(mmu=mmu if mmu_batch else None, t2i=t2i if t2i_batch else None)
    collator = OmniMambaDataCollator(config, image_processor=image_processor_for(config), max_text_length=text_length)
    collator = UidCollator(collator)
    fsdp_checkpointing = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    kwargs = dict(
        output_dir=out_dir,
        stage="stage2",
        per_device_mmu_batch_size=mmu_batch,
        per_device_t2i_batch_size=t2i_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16,
        tf32=cuda,
        activation_checkpointing=args.activation_checkpointing and not fsdp_checkpointing,
        ddp_find_unused_parameters=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        use_cpu=not cuda,  # on CPU: gloo; without it each process would train alone
        seed=args.seed,
    )
    kwargs.update(overrides)
    training_args = OmniMambaTrainingArguments(**kwargs)  # first: it sets up the process group and this rank's GPU
    if model is None:
        torch.manual_seed(args.seed)
        with torch.device(training_args.device):  # full size: 2.3B parameters, initialised on this process's GPU
            model = OmniMambaForConditionalGeneration(config)
    timer = make_step_timer()(args.warmup)
    trainer = make_trainer_class()(
        model, training_args, train_dataset=dataset, data_collator=collator, callbacks=[timer, *callbacks]
    )
    trainer.keep_inputs = keep_inputs
    trainer.step_timer = timer
    trainer.train()
    return trainer


def _peak_memory() -> dict:
    import torch

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # Linux: KiB
    if torch.cuda.is_available():
        out.update(
            device=torch.cuda.get_device_name(torch.cuda.current_device()),
            cuda_device=torch.cuda.current_device(),
            peak_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
            peak_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
        )
    else:
        out["device"] = platform.processor() or "cpu"
    return out


def leg_summary(trainer, args, *, world: int, mmu_batch: int, t2i_batch: int, accumulation: int) -> dict:
    """This process's view of a finished run: the logged trajectory, timings, memory, batches."""
    from omnimamba_hf.training import task_loss_history

    history = task_loss_history(trainer.state.log_history)
    grad_norm = [e.get("grad_norm", math.nan) for e in trainer.state.log_history if "loss" in e]
    times = trainer.step_timer.times[args.warmup:]
    mean = statistics.fmean(times) if times else math.nan
    samples = world * accumulation * (mmu_batch + t2i_batch)
    accelerator = trainer.accelerator
    return {
        "world_size": trainer.args.world_size,
        "process_index": trainer.args.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "fsdp": bool(trainer.is_fsdp_enabled),
        "mixed_precision": accelerator.mixed_precision,
        "activation_checkpointing": bool(trainer.args.activation_checkpointing)
        or os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true",
        "per_device_batch": {"mmu": mmu_batch, "t2i": t2i_batch},
        "gradient_accumulation_steps": accumulation,
        "global_batch": {"mmu": world * accumulation * mmu_batch, "t2i": world * accumulation * t2i_batch},
        "loss": history["loss"],
        "loss_mmu": history["loss_mmu"],
        "loss_t2i": history["loss_t2i"],
        "grad_norm": grad_norm,
        "step_seconds": [round(t, 5) for t in trainer.step_timer.times],
        "timed_steps": len(times),
        "seconds_per_step_mean": round(mean, 5) if times else None,
        "steps_per_second": round(1 / mean, 5) if times else None,
        "samples_per_second": round(samples / mean, 3) if times else None,
        "seen_uids": trainer.__dict__.get("seen_uids", []),
        **_peak_memory(),
    }


def _leg_record(summaries: list[dict]) -> dict:
    """One leg's JSON: the shared values (rank 0's) plus a list of what differs per process."""
    shared = {k: v for k, v in summaries[0].items() if k not in _PER_PROCESS}
    shared["processes"] = [{"process_index": s["process_index"], **{k: s[k] for k in _PER_PROCESS if k in s}} for s in summaries]
    return shared


def run_leg(args) -> None:
    """`--leg single|multi`: one leg, its JSON written (by rank 0) to `--leg-output`."""
    import gc

    import torch
    import torch.distributed as dist

    config = build_config(args)
    batch = {"mmu_batch": args.mmu_batch, "t2i_batch": args.t2i_batch}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.leg == "multi":
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            trainer = run_trainer(args, config, world=launched, accumulation=1, out_dir=tmp, **batch)
            if trainer.args.world_size != launched:
                raise SystemExit(f"The Trainer sees world size {trainer.args.world_size}; {launched} processes run.")
            mine = leg_summary(trainer, args, world=launched, accumulation=1, **batch)
            gathered = [mine]
            if dist.is_initialized():
                gathered = [None] * launched
                dist.all_gather_object(gathered, mine)
            if trainer.args.process_index == 0:
                results["multi"] = _leg_record(gathered)
        else:
            for reference in args.references:  # accumulate: N micro-batches; concat: one of N × the per-device batch
                accumulation = args.world if reference == "accumulate" else 1
                factor = 1 if reference == "accumulate" else args.world
                sizes = {"mmu_batch": args.mmu_batch * factor, "t2i_batch": args.t2i_batch * factor}
                trainer = run_trainer(args, config, world=1, accumulation=accumulation, out_dir=tmp, **sizes)
                results[reference] = _leg_record([leg_summary(trainer, args, world=1, accumulation=accumulation, **sizes)])
                trainer.optimizer = trainer.lr_scheduler = None
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    if results:
        with open(args.leg_output, "w", encoding="utf-8") as f:
            json.dump(results, f)


_PER_PROCESS = ("device", "cuda_device", "peak_memory_allocated_gib", "peak_memory_reserved_gib", "peak_rss_gib",
                "step_seconds", "seconds_per_step_mean", "steps_per_second", "seen_uids")  # fmt: skip


# ---- driver ---------------------------------------------------------------------------------------------------------


def _leg_argv(args, leg: str, out: str) -> list[str]:
    argv = ["--leg", leg, "--leg-output", out, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--mmu-batch", str(args.mmu_batch), "--t2i-batch", str(args.t2i_batch), "--dropout", str(args.dropout),
            "--learning-rate", repr(args.learning_rate), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
            "--references", ",".join(args.references) or "none", "--world", str(args.nproc)]  # fmt: skip
    for flag, on in (("--tiny", args.tiny), ("--activation-checkpointing", args.activation_checkpointing),
                     ("--no-bf16", args.no_bf16), ("--variable-mmu-answers", args.variable_mmu_answers)):  # fmt: skip
        if on:
            argv.append(flag)
    if args.config:
        argv += ["--config", args.config]
    return argv


def launch_command(args, out: str) -> list[str]:
    script = os.path.abspath(__file__)
    if args.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                script, *_leg_argv(args, "multi", out)]  # fmt: skip
    config = args.accelerate_config or os.path.join(ROOT, "configs", "accelerate", f"{args.strategy}.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes",
            str(args.nproc), "--mixed_precision", "bf16" if args.bf16 else "no", script, *_leg_argv(args, "multi", out)]  # fmt: skip


def _environment(args) -> dict:
    env = {**os.environ, **NVLS_OFF}
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], env: dict, timeout: int, label: str) -> float:
    print(f"[multi_gpu_parity] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"[multi_gpu_parity] the {label} leg failed (exit status {done.returncode}).")
    return time.perf_counter() - start


def _rel_per_step(a: list[float], b: list[float]) -> list[float]:
    if len(a) != len(b):
        return [math.inf]
    return [0.0 if math.isnan(x) and math.isnan(y) else abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def compare(multi: dict, reference: dict, rtol: float) -> dict:
    """Per-step relative differences of the logged values, and whether every step read the same samples."""
    out = {"rel_diff_per_step": {}}
    for key in ("loss", "loss_mmu", "loss_t2i", "grad_norm"):
        per_step = _rel_per_step(multi[key], reference[key])
        out["rel_diff_per_step"][key] = [float(f"{x:.3g}") for x in per_step]
        out[f"max_rel_diff_{key}"] = max(per_step, default=0.0)
    steps = len(reference["loss"])
    # the union over processes of step k's micro-batches vs the reference's micro-batches of step k
    per_process = [p["seen_uids"] for p in multi["processes"]]
    ref_uids = reference["processes"][0]["seen_uids"]
    accumulation = reference["gradient_accumulation_steps"]
    same = len(ref_uids) == steps * accumulation and all(len(u) == steps for u in per_process)
    if same:
        for k in range(steps):
            multi_step = sorted(u for uids in per_process for u in uids[k])
            ref_step = sorted(u for uids in ref_uids[k * accumulation : (k + 1) * accumulation] for u in uids)
            same = same and multi_step == ref_step and len(set(multi_step)) == len(multi_step)
    out["same_samples_every_step"] = same
    keys = ("loss", "loss_mmu", "loss_t2i", "grad_norm")
    out["passed"] = same and all(out[f"max_rel_diff_{k}"] <= rtol for k in keys)
    if multi.get("samples_per_second") and reference.get("samples_per_second"):
        speedup = multi["samples_per_second"] / reference["samples_per_second"]
        out["speedup_vs_single"] = round(speedup, 4)
        out["scaling_efficiency"] = round(speedup / multi["world_size"], 4)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.leg:
        run_leg(args)
        return {}
    import torch

    env = _environment(args)
    with tempfile.TemporaryDirectory() as tmp:
        single_out, multi_out = os.path.join(tmp, "single.json"), os.path.join(tmp, "multi.json")
        single_cmd = [sys.executable, os.path.abspath(__file__), *_leg_argv(args, "single", single_out)]
        multi_cmd = launch_command(args, multi_out)
        wall = {}
        if args.references and not args.reuse_single:
            single_env = dict(env)
            if torch.cuda.is_available():
                single_env.setdefault("CUDA_VISIBLE_DEVICES", "0")
            wall["single"] = _run(single_cmd, single_env, args.timeout, "single-process")
        legs = {}
        if not args.single_only:
            wall["multi"] = _run(multi_cmd, env, args.timeout, f"{args.nproc}-process")
            with open(multi_out, encoding="utf-8") as f:
                legs = json.load(f)
        if args.references:
            with open(args.reuse_single or single_out, encoding="utf-8") as f:
                earlier = json.load(f)
            if args.reuse_single:  # the same run settings, or the comparison means nothing
                mine = {"steps": args.steps, "learning_rate": args.learning_rate, "task_adapter_dropout": args.dropout,
                        "mmu_answers": _answers(args), "precision": "bf16" if args.bf16 else "fp32"}  # fmt: skip
                differ = {k: (earlier.get(k), v) for k, v in mine.items() if earlier.get(k) != v}
                if differ:
                    raise SystemExit(f"[multi_gpu_parity] {args.reuse_single} was run with other settings: {differ}")
            earlier = earlier.get("legs", earlier)
            missing = [r for r in args.references if r not in earlier]
            if missing:
                raise SystemExit(f"[multi_gpu_parity] no single-process leg {missing} in {args.reuse_single}.")
            legs.update({r: earlier[r] for r in args.references})
    comparison = {} if args.single_only else {ref: compare(legs["multi"], legs[ref], args.rtol) for ref in args.references}
    config = build_config(args)
    result = {
        "config": args.config or ("tiny" if args.tiny else "OmniMamba-1.3B (released layout, random weights)"),
        "stage": "stage2",
        "nproc": args.nproc,
        "strategy": args.strategy,
        "launcher": args.launcher,
        "multi_command": None if args.single_only else " ".join(multi_cmd),
        "steps": args.steps,
        "warmup_steps_untimed": args.warmup,
        "precision": "bf16" if args.bf16 else "fp32",
        "kernels": _kernels_available(),
        "task_adapter_dropout": config.task_lora_dropout,
        "mmu_answers": _answers(args),
        "learning_rate": args.learning_rate,
        "rtol": args.rtol,
        "leg_wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "single_legs_from": args.reuse_single or "this run",
        "legs": legs,
        "comparison": comparison,
        "passed": all(c["passed"] for c in comparison.values()),  # vacuous with --single-only / --references none
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "accelerate": __import__("accelerate").__version__},  # fmt: skip
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


def _answers(args) -> str:
    return "variable length" if args.variable_mmu_answers else "fixed length (equal supervised tokens)"


def _kernels_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    from omnimamba_hf.modeling.mixer_omnimamba import mamba_kernels

    return mamba_kernels() is not None


if __name__ == "__main__":
    try:
        import omnimamba_hf  # noqa: F401
    except ImportError:  # running from a checkout without installing
        sys.path.insert(0, os.path.join(ROOT, "src"))
    outcome = main()
    sys.exit(0 if not outcome or outcome.get("passed") else 1)
