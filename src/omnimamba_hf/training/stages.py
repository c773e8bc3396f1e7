"""The decoupled two-stage training recipe of OmniMamba as named presets (ORIGINAL-SPEC §7.1, §7.2).

A preset says, for `OmniMambaForConditionalGeneration`, which parameters are trainable, which modules run in train
mode, which tasks the stage trains, which MMU text format it uses and the original's hyper-parameters:

| preset | tasks | trainable | original |
|---|---|---|---|
| `stage1_mmu` | mmu (align captions) | projector, MMU task adapter | `config_stage1_mmu.yaml`, `freeze_backbones("align")` |
| `stage1_t2i` | t2i | image-code table + MLP (= image head), T2I position table, caption MLP, text embedding (= lm_head), T2I task adapter | `config_stage1_t2i.yaml` |
| `stage2` | mmu (instruction) + t2i | everything except the vision towers and the VQ (both adapters, projector, embeddings, heads, position tables, caption MLP, all Mamba weights) | `config_stage2.yaml`, `freeze_backbones("finetune")` |

Deviation (a defect fix, spec §7.2 / §8 #11): in the original stage-1 runs *both* task adapters are trainable although
only the running task's adapter is used; under DDP with `find_unused_parameters=False` an unused trainable parameter
makes the reducer fail on the next iteration. Here the inactive adapter is frozen. Everything else follows the
original, including its oddities: `mmu_position_embeddings` stays frozen (at its random init) in stage-1 MMU, and the
text embedding (tied to `lm_head`) is trained in stage-1 T2I.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Shared optimiser / schedule settings of every original run (spec §7.3); `TrainingArguments` field names.
RECIPE_DEFAULTS: dict[str, Any] = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.01},
    "bf16": True,
    "tf32": True,
    "save_steps": 5000,
    "save_total_limit": 5,
    "logging_steps": 500,
    "ddp_find_unused_parameters": False,
    "gradient_accumulation_steps": 1,
}


@dataclass(frozen=True)
class StagePreset:
    """One training stage. Patterns are regular expressions matched (`re.search`) against parameter / module names of
    `OmniMambaForConditionalGeneration` (e.g. `model.projector.linear_1.weight`)."""

    name: str
    description: str
    tasks: tuple[str, ...]
    mmu_format: str | None  # "align" (caption + <|endoftext|>) or "finetune" (In:/Out: conversations), None: no MMU
    trainable: tuple[str, ...]  # parameters matching one of these get requires_grad=True, all others False
    train_mode: tuple[str, ...] | None  # modules put in train mode (others eval); None = whole model except `eval_mode`
    eval_mode: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainingArguments / OmniMambaTrainingArguments values

    def is_trainable(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.trainable)


_ADAPTER = r"\.mixer\.in_proj\.task_adapters\.{task}\."
_ADAPTER_DROPOUT = r"\.mixer\.in_proj\.adapter_dropout$"

STAGES: dict[str, StagePreset] = OrderedDict(
    stage1_mmu=StagePreset(
        name="stage1_mmu",
        description="Stage 1, MMU alignment: image captions; projector and the MMU task adapter trainable.",
        tasks=("mmu",),
        mmu_format="align",
        trainable=(r"^model\.projector\.", _ADAPTER.format(task="mmu")),
        # the original puts the projector and every LoRA module (incl. its dropout) in train mode, the rest in eval
        train_mode=(r"^model\.projector$", r"\.mixer\.in_proj\.task_adapters\.mmu$", _ADAPTER_DROPOUT),
        defaults={
            "learning_rate": 1e-3,
            "max_steps": 5000,
            "warmup_steps": 100,
            "per_device_mmu_batch_size": 32,
            "per_device_t2i_batch_size": 0,
        },
    ),
    stage1_t2i=StagePreset(
        name="stage1_t2i",
        description=(
            "Stage 1, T2I pre-training: image-code embeddings + MLP (tied image head), T2I position table, caption "
            "MLP, text embedding (tied lm_head) and the T2I task adapter trainable."
        ),
        tasks=("t2i",),
        mmu_format=None,
        trainable=(
            r"^model\.image_embeddings\.",
            r"^image_head\.",
            r"^model\.t2i_position_embeddings$",
            r"^model\.caption_mlp\.",
            r"^model\.language_model\.embeddings\.",
            r"^lm_head\.",
            _ADAPTER.format(task="t2i"),
        ),
        train_mode=(
            r"^model\.image_embeddings$",
            r"^model\.caption_mlp$",
            r"^image_head$",
            r"\.mixer\.in_proj\.task_adapters\.t2i$",
            _ADAPTER_DROPOUT,
        ),
        defaults={
            "learning_rate": 8e-4,
            "max_steps": 100000,
            "warmup_steps": 1000,
            "per_device_mmu_batch_size": 0,
            "per_device_t2i_batch_size": 90,
        },
    ),
    stage2=StagePreset(
        name="stage2",
        description=(
            "Stage 2, unified fine-tuning: the whole model except the vision towers and the VQ tokenizer (Mamba "
            "backbone, both task adapters, projector, embeddings, heads, position tables, caption MLP)."
        ),
        tasks=("mmu", "t2i"),
        mmu_format="finetune",
        trainable=(r"^(?!model\.vision_model\.|model\.vqmodel\.)",),
        train_mode=None,
        eval_mode=(r"^model\.vision_model$", r"^model\.vqmodel$"),
        defaults={
            "learning_rate": 1e-4,
            "max_steps": 150000,
            "warmup_steps": 0,
            "per_device_mmu_batch_size": 3,
            "per_device_t2i_batch_size": 48,
        },
    ),
)


def get_stage(stage: str | StagePreset) -> StagePreset:
    if isinstance(stage, StagePreset):
        return stage
    aliases = {"1-mmu": "stage1_mmu", "1-t2i": "stage1_t2i", "2": "stage2", "align-mmu": "stage1_mmu"}
    key = aliases.get(stage, stage)
    if key not in STAGES:
        raise ValueError(f"Unknown training stage {stage!r}: use one of {list(STAGES)}.")
    return STAGES[key]


def stage_training_defaults(stage: str | StagePreset) -> dict[str, Any]:
    """The original's hyper-parameters for `stage` (spec §7.1, §7.3), as `OmniMambaTrainingArguments` values."""
    return {**RECIPE_DEFAULTS, **get_stage(stage).defaults}


# ---- applying a preset ------------------------------------------------------------------------------------------------


@dataclass
class StageReport:
    """Trainable / frozen parameter counts after a preset was applied (unique tensors: tied weights counted once)."""

    stage: str
    trainable: int
    frozen: int
    by_module: dict[str, tuple[int, int]]  # top-level module -> (trainable, frozen)
    trainable_names: list[str]

    def format(self) -> str:
        lines = [f"stage {self.stage}: trainable {self.trainable:,} / frozen {self.frozen:,} parameters"]
        for module, (t, f) in self.by_module.items():
            lines.append(f"  {'TRAINABLE' if t else 'frozen   '} {module:<45} trainable {t:>14,}  frozen {f:>14,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "trainable": self.trainable,
            "frozen": self.frozen,
            "by_module": {k: {"trainable": t, "frozen": f} for k, (t, f) in self.by_module.items()},
        }


def unwrap_omnimamba(model: nn.Module) -> nn.Module:
    """The `OmniMambaForConditionalGeneration` inside DDP / torch.compile / PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
    return model


def _group(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["model", "language_model"] and len(parts) > 2:
        if parts[2] == "layers":
            return "model.language_model.layers.*.task_adapters" if "task_adapters" in name else "model.language_model.layers"
        return f"model.language_model.{parts[2]}"
    if parts[0] == "model" and len(parts) > 1:
        return f"model.{parts[1]}"
    return parts[0]


def parameter_report(model: nn.Module, stage: str = "custom") -> StageReport:
    """Count trainable / frozen unique parameters of `model`, grouped by top-level module."""
    base = unwrap_omnimamba(model)
    by_module: dict[str, list[int]] = OrderedDict()
    trainable = frozen = 0
    names = []
    for name, p in base.named_parameters():  # named_parameters() yields each tied tensor once
        counts = by_module.setdefault(_group(name), [0, 0])
        if p.requires_grad:
            trainable += p.numel()
            counts[0] += p.numel()
            names.append(name)
        else:
            frozen += p.numel()
            counts[1] += p.numel()
    return StageReport(stage, trainable, frozen, {k: (v[0], v[1]) for k, v in by_module.items()}, names)


def _is_peft_parameter(name: str) -> bool:
    return ".lora_" in name or "lora_embedding" in name or "modules_to_save" in name


def apply_stage(model: nn.Module, stage: str | StagePreset, log: bool = True) -> StageReport:
    """Set `requires_grad` (and train/eval modes) of `model` exactly as the preset says; return the counts.

    `model` is an `OmniMambaForConditionalGeneration`, possibly wrapped (DDP, torch.compile, PEFT). Parameters that PEFT
    added (`lora_A/lora_B`, `modules_to_save`) keep their own `requires_grad`.
    """
    preset = get_stage(stage)
    base = unwrap_omnimamba(model)
    if not hasattr(base, "model") or not hasattr(base.model, "language_model"):
        raise TypeError(f"apply_stage expects an OmniMambaForConditionalGeneration, got {type(base).__name__}.")
    for name, p in base.named_parameters(remove_duplicate=False):
        if _is_peft_parameter(name):
            continue
        clean = re.sub(r"\.base_layer(?=\.|$)", "", name)  # PEFT-wrapped layers keep their base weight here
        p.requires_grad_(preset.is_trainable(clean))
    # tied weights are one Parameter: make sure an alias never overrides the preset of the other name
    for name, p in base.named_parameters():
        clean = re.sub(r"\.base_layer(?=\.|$)", "", name)
        if _is_peft_parameter(name):
            continue
        if preset.is_trainable(clean) != p.requires_grad:
            raise RuntimeError(f"Stage {preset.name}: tied parameter {name} got inconsistent requires_grad.")
    set_stage_modes(base, preset)
    report = parameter_report(base, preset.name)
    if log:
        logger.info(report.format())
    return report


def stage_eval_modules(model: nn.Module, stage: str | StagePreset) -> list[nn.Module]:
    """Modules that the preset keeps in eval mode while the model trains (cached by the trainer: `model.train()` is
    called every step, after which these are switched back)."""
    preset = get_stage(stage)
    base = unwrap_omnimamba(model)
    named = [(re.sub(r"\.base_layer(?=\.|$)", "", n), m) for n, m in base.named_modules()]
    if preset.train_mode is None:
        return [m for n, m in named if n and any(re.search(p, n) for p in preset.eval_mode)]
    train = [n for n, _ in named if n and any(re.search(p, n) for p in preset.train_mode)]

    def in_train(n: str) -> bool:  # a train-mode module, or inside / above one
        return any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in train) or n == ""

    # leaves of the "eval" region: modules not related to any train-mode module, whose parent is related
    out = []
    for n, m in named:
        if in_train(n):
            continue
        parent = n.rsplit(".", 1)[0] if "." in n else ""
        if in_train(parent):
            out.append(m)
    return out


def set_stage_modes(model: nn.Module, stage: str | StagePreset, modules: list[nn.Module] | None = None) -> None:
    """`model.train()`, then eval mode for what the preset freezes (the original's `freeze_backbones` modes)."""
    model.train()
    for m in modules if modules is not None else stage_eval_modules(model, stage):
        m.eval()


# ---- initialisation helpers ---------------------------------------------------------------------------------------


_MIXER_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def _load_state_dict_file(path) -> dict[str, torch.Tensor]:
    import os

    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, candidate)):
                path = os.path.join(path, candidate)
                break
        else:
            raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in {path}.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj


def load_mamba2_text_weights(model: nn.Module, source) -> list[str]:
    """Initialise the language backbone from a Mamba-2 LM checkpoint, as the original stage-1 runs do
    (`mamba_pretrain: ckpts/mamba2_1.3b/pytorch_model.bin`, loaded with `strict=False`, spec §1.8).

    `source`: a state dict, a file (`pytorch_model.bin` / `.safetensors`) or a directory holding one, in mamba_ssm
    layout (`backbone.embedding.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`) or transformers'
    `Mamba2ForCausalLM` layout (`backbone.embeddings.weight`). Every backbone tensor must be present with the right
    shape (unlike the original's silent `strict=False`); task adapters, position tables, image/caption modules,
    projector keep their init. Returns the loaded target names.
    """
    base = unwrap_omnimamba(model)
    sd = source if isinstance(source, dict) else _load_state_dict_file(source)
    lm = base.model.language_model
    mapping = {"model.language_model.embeddings.weight": ("backbone.embedding.weight", "backbone.embeddings.weight")}
    mapping["model.language_model.norm_f.weight"] = ("backbone.norm_f.weight",)
    for i in range(len(lm.layers)):
        mapping[f"model.language_model.layers.{i}.norm.weight"] = (f"backbone.layers.{i}.norm.weight",)
        for key in _MIXER_KEYS:
            mapping[f"model.language_model.layers.{i}.mixer.{key}"] = (f"backbone.layers.{i}.mixer.{key}",)
    params = dict(base.named_parameters())
    missing, bad_shape, loaded = [], [], []
    with torch.no_grad():
        for target, candidates in mapping.items():
            src = next((sd[c] for c in candidates if c in sd), None)
            if src is None:
                missing.append(candidates[0])
                continue
            p = params[target]
            if tuple(src.shape) != tuple(p.shape):
                bad_shape.append(f"{candidates[0]} {tuple(src.shape)} vs {target} {tuple(p.shape)}")
                continue
            p.copy_(src.to(p.dtype))
            loaded.append(target)
    if missing or bad_shape:
        raise ValueError(
            "The Mamba-2 checkpoint does not fit the language backbone: "
            + (f"missing {missing[:5]}{' …' if len(missing) > 5 else ''} ({len(missing)} keys); " if missing else "")
            + (f"shape mismatches {bad_shape[:5]}" if bad_shape else "")
        )
    logger.info(f"Initialised {len(loaded)} language-backbone tensors from the Mamba-2 checkpoint.")
    return loaded


def merge_stage_checkpoints(target: nn.Module, sources: dict[str, nn.Module | dict]) -> dict[str, int]:
    """Build the stage-2 starting point from stage-1 results (spec §7.6: the original ships no merge script).

    For each `stage -> model (or state dict)` in `sources`, copy the parameters that stage trains into `target`;
    everything else keeps `target`'s values (the frozen base both stage-1 runs shared). Two stages that train the same
    tensor are an error. Returns the number of tensors copied per stage.
    """
    base = unwrap_omnimamba(target)
    params = dict(base.named_parameters())
    owner: dict[str, str] = {}
    counts = {}
    with torch.no_grad():
        for stage, source in sources.items():
            preset = get_stage(stage)
            sd = source if isinstance(source, dict) else unwrap_omnimamba(source).state_dict()
            n = 0
            for name, p in params.items():
                if not preset.is_trainable(name):
                    continue
                if name in owner:
                    raise ValueError(f"{name} is trained by both {owner[name]} and {preset.name}.")
                if name not in sd:
                    raise KeyError(f"{preset.name} checkpoint lacks {name}.")
                p.copy_(sd[name].to(p.dtype))
                owner[name] = preset.name
                n += 1
            counts[preset.name] = n
    return counts


__all__ = [
    "RECIPE_DEFAULTS",
    "STAGES",
    "StagePreset",
    "StageReport",
    "apply_stage",
    "get_stage",
    "load_mamba2_text_weights",
    "merge_stage_checkpoints",
    "parameter_report",
    "set_stage_modes",
    "stage_eval_modules",
    "stage_training_defaults",
    "unwrap_omnimamba",
]
