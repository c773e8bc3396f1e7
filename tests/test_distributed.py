"""Multi-process training on CPU (issue #10, the part that needs no GPU): 2 processes, gloo, the tiny config of
`common.tiny_config()` with the task adapters' dropout at 0, `OmniMambaTrainer` under DDP exactly as on GPUs.

* `ddp_report` (one `torchrun --nproc-per-node 2` launch of this file as a worker, two stage-2 runs of 2 steps): after
  every backward the gradients of all trainable parameters are bit-identical on both ranks and equal (1e-6 relative)
  the single-process gradient on the concatenated global batch; after every optimiser step the parameters are
  bit-identical; every rank consumed exactly its per-device MMU/T2I batch, the ranks' samples are disjoint, and
  their union is what one process reads with the global batch sizes. The second run gives the MMU samples different
  answer lengths: the DDP gradient is then the mean of the per-rank token-mean gradients (what the original did on
  8 GPUs), which differs from the concatenated-batch gradient — the one semantic difference between N GPUs and one.
* FSDP1 set up as `configs/accelerate/fsdp.yaml` says (its wrap classes = `_no_split_modules`, FULL_SHARD,
  use_orig_params, checkpoint wrapper; built directly with torch, as accelerate refuses FSDP without a GPU) gives the
  same gradient as DDP.
* `benchmarks/multi_gpu_parity.py --tiny` (`accelerate launch --config_file configs/accelerate/ddp.yaml`, 2 gloo
  processes, vs 1 process with the same global batch by gradient accumulation and as one concatenated batch): equal
  per-step loss, loss_mmu, loss_t2i and grad_norm (1e-5 relative) over 4 steps, the same samples in every step,
  steps/s and peak memory of each process in the JSON.

The existing `test_training.py::test_ddp_on_two_cpu_processes_trains_and_resumes` covers the CLI under torchrun and a
mid-epoch resume; nothing of it is repeated here. Both launches run concurrently: about 45 s on 2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(ROOT, "benchmarks", "multi_gpu_parity.py")
WORLD, MMU, T2I, STEPS = 2, 2, 3, 2  # worker: per-device 2 MMU + 3 T2I, 2 processes, 2 optimiser steps
TIMEOUT = 240
SCENARIOS = ("equal_mmu_tokens", "unequal_mmu_tokens")  # MMU answers of one length / of random lengths


def _load_parity():
    if "multi_gpu_parity" in sys.modules:
        return sys.modules["multi_gpu_parity"]
    spec = importlib.util.spec_from_file_location("multi_gpu_parity", PARITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["multi_gpu_parity"] = module
    spec.loader.exec_module(module)
    return module


def _env() -> dict:
    src = os.path.join(ROOT, "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


# ---- the worker (runs under torchrun: `python -m torch.distributed.run ... test_distributed.py --worker CFG OUT`) ----


def _rel(got, want) -> float:
    """||got - want|| / ||want|| (absolute when want is 0)."""
    denominator = float(want.norm())
    difference = float((got - want).norm())
    return difference / denominator if denominator > 0 else difference


def _reference_gradients(model, params, batches, mode: str) -> dict:
    """Single-process gradients at `params` for the ranks' micro-batches `batches` (one dict per rank):
    `concat` = one forward per task on the concatenated global batch; `mean` = the mean of the per-rank losses."""
    import torch

    from omnimamba_hf.training import apply_stage

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    apply_stage(model, "stage2", log=False)
    model.zero_grad(set_to_none=True)
    if mode == "concat":
        loss = 0
        for task in batches[0]:
            merged = {k: torch.cat([b[task][k] for b in batches]) for k in batches[0][task]}
            loss = loss + model(**merged, task=task, use_cache=False, logits_to_keep=1).loss
    else:
        per_rank = [sum(model(**b[t], task=t, use_cache=False, logits_to_keep=1).loss for t in b) for b in batches]
        loss = sum(per_rank) / len(batches)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fsdp_check(config, batches, initial) -> dict:
    """FSDP1 as configs/accelerate/fsdp.yaml sets it up (accelerate itself refuses FSDP without a GPU): the yaml's
    wrap classes, FULL_SHARD, use_orig_params, the non-reentrant checkpoint wrapper on the same classes. One stage-2
    forward per task on this rank's micro-batch, one backward: the full gradients must equal the mean of the per-rank
    loss gradients, as under DDP."""
    import functools

    import torch
    import torch.distributed as dist
    import yaml
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from omnimamba_hf import OmniMambaForConditionalGeneration
    from omnimamba_hf.training import apply_stage

    with open(os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"), encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    fsdp = settings["fsdp_config"]
    names = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    model = OmniMambaForConditionalGeneration(config)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial[name])
    apply_stage(model, "stage2", log=False)
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy[fsdp["fsdp_sharding_strategy"]],
        use_orig_params=fsdp["fsdp_use_orig_params"], device_id=torch.device("cpu"),
    )  # fmt: skip
    if fsdp["fsdp_activation_checkpointing"]:
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=wrapper, auto_wrap_policy=policy)
    mine = batches[dist.get_rank()]
    loss = sum(wrapped(**mine[t], task=t, use_cache=False, logits_to_keep=1).loss for t in mine)
    loss.backward()
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        grads = {
            n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): p.grad.detach().clone()
            for n, p in wrapped.named_parameters()
            if p.requires_grad and p.grad is not None
        }
    out = {
        "yaml_classes": sorted(names),
        "no_split_modules": sorted(OmniMambaForConditionalGeneration._no_split_modules),
        "classes_found": sorted(c.__name__ for c in classes),
        "mixed_precision": settings["mixed_precision"],
        "fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()),
        "checkpoint_wrappers": sum(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules()),
    }
    if dist.get_rank() == 0:
        ref = _reference_gradients(reference, initial, batches, "mean")
        out["trainable_with_grad"] = [len(grads), len(ref)]
        out["max_rel_grad_diff_vs_mean"] = max(_rel(grads[n], ref[n]) for n in ref) if set(ref) == set(grads) else None
    return out


def _worker(config_dir: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate.data_loader import BatchSamplerShard
    from transformers import TrainerCallback

    from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
    from omnimamba_hf.training import MixedTaskBatchSampler

    torch.set_num_threads(1)
    parity = _load_parity()
    config = OmniMambaConfig.from_pretrained(config_dir)
    assert config.task_lora_dropout == 0

    class Capture(TrainerCallback):
        """Trainable gradients just before each optimiser step (after DDP's all-reduce), all parameters after it."""

        def __init__(self, model):
            self.model, self.grads, self.params = model, [], []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})

        def on_step_end(self, args, state, control, **kwargs):
            self.params.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    report = {}
    for scenario in SCENARIOS:
        variable = scenario == "unequal_mmu_tokens"
        torch.manual_seed(0)
        model = OmniMambaForConditionalGeneration(config)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        reference_model = copy.deepcopy(model)
        capture = Capture(model)
        args = SimpleNamespace(steps=STEPS, warmup=0, seed=0, learning_rate=3e-3, bf16=False, activation_checkpointing=False,
                               num_workers=0, variable_mmu_answers=variable)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            trainer = parity.run_trainer(
                args, config, world=WORLD, mmu_batch=MMU, t2i_batch=T2I, accumulation=1, out_dir=tmp, callbacks=[capture],
                keep_inputs=True, model=model, max_grad_norm=0.0,  # no clipping: the raw all-reduced gradients
            )  # fmt: skip
            loader = trainer.get_train_dataloader()
        shard = loader.batch_sampler
        mine = {
            "grads": capture.grads,
            "params": capture.params,
            "inputs": trainer.seen_inputs,
            "uids": trainer.seen_uids,
            "rank": trainer.args.process_index,
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "ddp_wrapped": type(trainer.model_wrapped).__name__,
            "sampler": [type(shard).__name__, type(getattr(shard, "batch_sampler", None)).__name__,
                        getattr(getattr(shard, "batch_sampler", None), "batch_sizes", None)],  # fmt: skip
            "loader_len": len(loader),
            "total_train_batch_size": (
                trainer._train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
            ),  # the Trainer's "Total train batch size"
            "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
            "task_sizes": trainer.train_dataset.task_sizes,
            "logged": [{k: e[k] for k in ("loss", "loss_mmu", "loss_t2i")} for e in trainer.state.log_history if "loss" in e],
        }
        ranks = [None] * WORLD
        dist.all_gather_object(ranks, mine)
        ranks.sort(key=lambda r: r["rank"])
        if scenario == "equal_mmu_tokens":
            fsdp_inputs = ([r["inputs"][0] for r in ranks], initial)
        if dist.get_rank() != 0:
            continue
        r0 = ranks[0]
        out = {k: [r[k] for r in ranks] for k in ("rank", "world_size", "distributed_type", "backend", "ddp_wrapped",
                                                 "sampler", "loader_len", "total_train_batch_size",
                                                 "per_device_train_batch_size")}  # fmt: skip
        # (a) gradients and parameters across ranks: bit-identical
        for key in ("grads", "params"):
            out[f"max_abs_{key}_diff_across_ranks"] = max(
                float((r[key][k][n] - r0[key][k][n]).abs().max())
                for r in ranks[1:]
                for k in range(STEPS)
                for n in r0[key][k]
            )
        out["num_trainable_tensors"] = len(r0["grads"][0])
        out["num_steps_captured"] = [len(r["grads"]) for r in ranks]
        out["nonzero_grad_tensors"] = sum(1 for g in r0["grads"][0].values() if float(g.abs().max()) > 0)
        out["params_moved"] = any(not torch.equal(r0["params"][0][n], initial[n]) for n in r0["grads"][0])
        # (a) gradients vs one process, at every step from the parameters before it
        for mode in ("concat", "mean"):
            worst = []
            for k in range(STEPS):
                before = initial if k == 0 else r0["params"][k - 1]
                ref = _reference_gradients(reference_model, before, [r["inputs"][k] for r in ranks], mode)
                assert set(ref) == set(r0["grads"][k])
                worst.append(max(_rel(r0["grads"][k][n], ref[n]) for n in ref))
            out[f"max_rel_grad_diff_vs_{mode}"] = worst
        # the logged per-task losses are the mean over ranks of each rank's token mean
        with torch.no_grad():
            for name, p in reference_model.named_parameters():
                p.copy_(initial[name])
            first = [r["inputs"][0] for r in ranks]
            out["logged_first_step"] = r0["logged"][0]
            out["rank_mean_first_step"] = {
                f"loss_{t}": sum(float(reference_model(**b[t], task=t, use_cache=False, logits_to_keep=1).loss) for b in first)
                / WORLD
                for t in ("mmu", "t2i")
            }
        # (b) what each rank consumed, and the global batch
        out["rows_per_rank_and_step"] = [
            [{t: int(r["inputs"][k][t]["input_ids"].shape[0]) for t in r["inputs"][k]} for k in range(STEPS)] for r in ranks
        ]
        global_sampler = MixedTaskBatchSampler(r0["task_sizes"], {"mmu": WORLD * MMU, "t2i": WORLD * T2I}, seed=0)
        per_device_sampler = MixedTaskBatchSampler(r0["task_sizes"], {"mmu": MMU, "t2i": T2I}, seed=0)

        def to_uid(batch):  # sampler indices (task position, row, draw) -> the synthetic records' uids
            return sorted(row if task == 0 else parity.T2I_UID_OFFSET + row for task, row, _ in batch)

        global_batches = [to_uid(b) for b in global_sampler][:STEPS]
        device_batches = [to_uid(b) for b in per_device_sampler]
        out["union_equals_global_sampler"] = all(
            sorted(u for r in ranks for u in r["uids"][k]) == global_batches[k] for k in range(STEPS)
        )
        out["ranks_disjoint"] = all(
            len({u for r in ranks for u in r["uids"][k]}) == sum(len(r["uids"][k]) for r in ranks) for k in range(STEPS)
        )
        out["rank_reads_round_robin"] = all(  # accelerate's BatchSamplerShard: rank r gets batch WORLD·k + r
            r["uids"][k] == device_batches[WORLD * k + r["rank"]] for r in ranks for k in range(STEPS)
        )
        shard_lists = [list(BatchSamplerShard(per_device_sampler, WORLD, i)) for i in range(WORLD)]
        out["shards_match_accelerate"] = all(
            r["uids"][k] == to_uid(shard_lists[r["rank"]][k]) for r in ranks for k in range(STEPS)
        )
        report[scenario] = out
    report["fsdp1"] = _fsdp_check(config, *fsdp_inputs)
    if dist.get_rank() == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


# ---- pytest side --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The tiny config (dropout 0) on disk, then both launches at once: the torchrun worker and the parity script."""
    from common import tiny_config

    d = tmp_path_factory.mktemp("distributed")
    tiny_config(task_lora_dropout=0.0).save_pretrained(d / "config")
    commands = {
        "worker": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                   os.path.abspath(__file__), "--worker", str(d / "config"), str(d / "ddp_report.json")],
        "parity": [sys.executable, PARITY, "--tiny", "--config", str(d / "config"), "--nproc", "2", "--steps", "4",
                   "--references", "accumulate,concat", "--output", str(d / "parity.json")],
    }  # fmt: skip
    running = {}
    for name, cmd in commands.items():  # output to files (no pipe to fill), each in its own process group
        log = open(d / f"{name}.log", "w")
        running[name] = (subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True), log)
    logs = {}
    for name, (process, log) in running.items():
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the ranks it started
            process.wait()
            code = "timeout"
        log.close()
        logs[name] = ((d / f"{name}.log").read_text(), code)
    return SimpleNamespace(dir=d, logs=logs)


@pytest.fixture(scope="module")
def ddp_report(launches):
    text, code = launches.logs["worker"]
    assert code == 0, text[-4000:]
    return json.loads((launches.dir / "ddp_report.json").read_text())


def test_ddp_gradients_are_synchronised_and_equal_the_single_process_gradient(ddp_report):
    for scenario in SCENARIOS:
        r = ddp_report[scenario]
        assert r["world_size"] == [WORLD] * WORLD and r["rank"] == list(range(WORLD)), scenario
        assert r["backend"] == ["gloo"] * WORLD and all("MULTI_CPU" in t for t in r["distributed_type"])
        assert r["ddp_wrapped"] == ["DistributedDataParallel"] * WORLD  # the Trainer really ran under DDP
        assert r["num_steps_captured"] == [STEPS] * WORLD and r["params_moved"]
        assert r["nonzero_grad_tensors"] > 0.5 * r["num_trainable_tensors"]
        # every rank holds the same all-reduced gradients, and the same parameters after each optimiser step
        assert r["max_abs_grads_diff_across_ranks"] == 0.0, scenario
        assert r["max_abs_params_diff_across_ranks"] == 0.0, scenario
        # DDP's gradient is the mean over ranks of the per-rank (token-mean) loss gradients, at every step
        assert max(r["max_rel_grad_diff_vs_mean"]) <= 1e-6, (scenario, r["max_rel_grad_diff_vs_mean"])
        for task in ("mmu", "t2i"):  # the logged per-task losses are reduced the same way
            want = r["rank_mean_first_step"][f"loss_{task}"]
            assert math.isclose(r["logged_first_step"][f"loss_{task}"], want, rel_tol=1e-5), (scenario, task)
    # with equal supervised-token counts per rank that is the one-process gradient on the concatenated global batch
    equal = ddp_report["equal_mmu_tokens"]
    assert max(equal["max_rel_grad_diff_vs_concat"]) <= 1e-6, equal["max_rel_grad_diff_vs_concat"]
    # with unequal MMU answer lengths it is not (per-device token means, as the original's multi-GPU runs): documented
    unequal = ddp_report["unequal_mmu_tokens"]
    assert max(unequal["max_rel_grad_diff_vs_concat"]) > 1e-3, unequal["max_rel_grad_diff_vs_concat"]


def test_ddp_global_batch_is_the_configured_per_device_batches_times_world_size(ddp_report):
    for scenario in SCENARIOS:
        r = ddp_report[scenario]
        assert r["per_device_train_batch_size"] == [MMU + T2I] * WORLD
        assert r["total_train_batch_size"] == [WORLD * (MMU + T2I)] * WORLD
        assert r["sampler"] == [["BatchSamplerShard", "MixedTaskBatchSampler", {"mmu": MMU, "t2i": T2I}]] * WORLD
        assert r["loader_len"] == [STEPS] * WORLD  # data sized for STEPS global batches: one epoch, no padding
        assert r["rows_per_rank_and_step"] == [[{"mmu": MMU, "t2i": T2I}] * STEPS] * WORLD, scenario
        assert r["ranks_disjoint"] and r["rank_reads_round_robin"] and r["shards_match_accelerate"], scenario
        # the union over ranks is exactly what one process reads with the global batch sizes (WORLD × per device)
        assert r["union_equals_global_sampler"], scenario


def test_fsdp_config_wraps_the_no_split_modules_and_gives_the_ddp_gradient(ddp_report):
    r = ddp_report["fsdp1"]
    assert r["yaml_classes"] == r["no_split_modules"] == r["classes_found"]  # every listed class exists in the model
    assert r["mixed_precision"] == "bf16"
    # the tiny model: 2 Mamba blocks, 3 + 3 tower layers, the pooling head, the VQ's blocks, and the root unit
    assert r["fsdp_units"] > 10 and r["checkpoint_wrappers"] == r["fsdp_units"] - 1
    assert r["trainable_with_grad"][0] == r["trainable_with_grad"][1]
    assert r["max_rel_grad_diff_vs_mean"] is not None and r["max_rel_grad_diff_vs_mean"] <= 1e-6, r


def test_multi_gpu_parity_benchmark_two_processes_match_one(launches):
    text, code = launches.logs["parity"]
    assert code == 0, text[-4000:]
    result = json.loads((launches.dir / "parity.json").read_text())
    assert result["passed"] and result["precision"] == "fp32" and result["task_adapter_dropout"] == 0
    assert result["launcher"] == "accelerate" and "configs/accelerate/ddp.yaml" in result["multi_command"]
    multi = result["legs"]["multi"]
    assert multi["world_size"] == 2 and "MULTI_CPU" in multi["distributed_type"] and len(multi["processes"]) == 2
    assert multi["global_batch"] == {"mmu": 4, "t2i": 8} and len(multi["loss"]) == 4
    for reference in ("accumulate", "concat"):
        leg, cmp = result["legs"][reference], result["comparison"][reference]
        assert leg["world_size"] == 1 and leg["global_batch"] == multi["global_batch"]
        assert cmp["same_samples_every_step"], reference
        for key in ("loss", "loss_mmu", "loss_t2i", "grad_norm"):
            assert cmp[f"max_rel_diff_{key}"] <= 1e-5, (reference, key, cmp)
            assert len(leg[key]) == 4 and all(math.isfinite(x) for x in leg[key])
        assert cmp["scaling_efficiency"] > 0
    assert result["legs"]["accumulate"]["gradient_accumulation_steps"] == 2
    assert result["legs"]["concat"]["per_device_batch"] == {"mmu": 4, "t2i": 8}
    for process in multi["processes"]:
        assert process["steps_per_second"] > 0 and process["peak_rss_gib"] > 0
    assert multi["loss"][-1] < multi["loss"][0]  # it trains


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, os.path.join(ROOT, "src"))
    _worker(sys.argv[2], sys.argv[3])
