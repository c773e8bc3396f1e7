"""PEFT (LoRA) for OmniMamba: user adapters on the Mamba mixers' `in_proj`, and the built-in task adapters as two
named PEFT adapters.

**Where LoRA works (CONVENTIONS §5.3).** PEFT's LoRA layer keeps `.weight` pointing at the base weight and adds its
update in `forward`. Code that reads a layer's `.weight` as a raw tensor instead of calling the module silently
bypasses the adapter. In OmniMamba's mixer that is `conv1d` (its weight goes straight into causal-conv1d's kernel, the
cached-conv path and the decode step) — and with mamba-ssm's fused `mamba_split_conv1d_scan_combined` (which the
original trains with) also `out_proj` and the gated `norm`. `in_proj`, which OmniMamba's own task LoRA targets, is
always called as a module. `get_omnimamba_lora_model` therefore targets `in_proj` by default and refuses targets
inside the mixer other than `in_proj` / `out_proj` (`out_proj` is called as a module by this port's mixer, but not by a
fused kernel: allowed only with `allow_out_proj=True`) as well as the built-in `task_adapters` and the tied heads.

**The built-in task adapters** (`in_proj.task_adapters.{mmu,t2i}`: r 8, alpha 32, dropout 0.05) are ordinary LoRA
pairs; `export_task_adapters` writes them as two PEFT adapter folders (`mmu/`, `t2i/`) that `PeftModel.from_pretrained`
/ `load_adapter` read onto any OmniMamba whose built-in adapters are neutral (`neutralize_task_adapters`), and
`import_task_adapters` does the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from .collators import TASKS
from .stages import unwrap_omnimamba

logger = logging.getLogger(__name__)

# module names (relative to OmniMambaForConditionalGeneration) a LoRA must not target
_MIXER = r"(^|\.)language_model\.layers\.\d+\.mixer\."
BYPASSED_TARGETS = {
    _MIXER + r"conv1d$": "its weight is read as a raw tensor by causal-conv1d, the cached-conv path and the decode step",
    _MIXER + r"norm$": "the gated RMSNorm is not a Linear and is fused into mamba-ssm's kernels",
    r"task_adapters\.(mmu|t2i)\.(down|up)$": "these are OmniMamba's built-in task adapters (fine-tune them directly)",
    r"(^|\.)(lm_head|image_head)$": "tied to the input embeddings; LoRA on one side would untie them",
}
_OUT_PROJ = _MIXER + r"out_proj$"
TASK_ADAPTER_TARGET = r".*language_model\.layers\.\d+\.mixer\.in_proj"


def _check_targets(names: Sequence[str], allow_out_proj: bool, model: nn.Module | None = None) -> None:
    problems = []
    modules = dict(model.named_modules()) if model is not None else {}
    for name in names:
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        if isinstance(parent, nn.MultiheadAttention):
            problems.append(f"{name} (torch's MultiheadAttention reads out_proj.weight as a raw tensor)")
        for pattern, why in BYPASSED_TARGETS.items():
            if re.search(pattern, name):
                problems.append(f"{name} ({why})")
        if not allow_out_proj and re.search(_OUT_PROJ, name):
            problems.append(
                f"{name} (mamba-ssm's fused training kernel reads out_proj.weight as a raw tensor and would skip the "
                "adapter; pass allow_out_proj=True only if you train without that kernel)"
            )
    if problems:
        shown = problems[:4] + ([f"… {len(problems) - 4} more"] if len(problems) > 4 else [])
        raise ValueError("LoRA targets that the OmniMamba forward would bypass: " + "; ".join(shown))


def get_omnimamba_lora_model(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] = ("in_proj",),
    adapter_name: str = "default",
    allow_out_proj: bool = False,
    **lora_kwargs,
):
    """`peft.get_peft_model` with a LoRA on the mixers' `in_proj` (default), after checking that no target is one the
    forward bypasses. The base model is frozen by PEFT (the built-in task adapters included); the returned
    `PeftModel` trains with `OmniMambaTrainer` as is and saves only the adapter (`save_pretrained`)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        **lora_kwargs,
    )
    # check with PEFT's own matching before anything is injected (PEFT may itself fail on e.g. depthwise conv1d)
    targeted = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not targeted:
        raise ValueError(f"LoRA target_modules={target_modules!r} matched no module.")
    _check_targets(targeted, allow_out_proj, model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    logger.info(f"User LoRA (r={r}, alpha={lora_alpha}) on {len(targeted)} modules, e.g. {targeted[0]}.")
    return peft_model


def load_omnimamba_lora(model: nn.Module, adapter_path: str, adapter_name: str = "default", is_trainable: bool = False):
    """Load a saved user adapter onto an OmniMamba model (`PeftModel.from_pretrained`), with the same target checks."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable)
    _check_targets(list(getattr(peft_model.base_model, "targeted_module_names", [])), allow_out_proj=True)
    return peft_model


# ---- the built-in task adapters as PEFT adapters --------------------------------------------------------------------


def _in_projs(model: nn.Module):
    base = unwrap_omnimamba(model)
    for i, layer in enumerate(base.model.language_model.layers):
        proj = layer.mixer.in_proj
        proj = getattr(proj, "base_layer", proj)  # under a PEFT wrapper
        yield f"model.language_model.layers.{i}.mixer.in_proj", proj


def export_task_adapters(model: nn.Module, output_dir: str, tasks: Sequence[str] = TASKS) -> dict[str, str]:
    """Write each built-in task adapter as a PEFT LoRA adapter folder `output_dir/<task>/` (`adapter_config.json` +
    `adapter_model.safetensors`, keys `base_model.model.<module>.lora_{A,B}.weight`). Returns `{task: folder}`.

    Load them with `PeftModel.from_pretrained(model, f"{output_dir}/mmu", adapter_name="mmu")` and
    `.load_adapter(f"{output_dir}/t2i", adapter_name="t2i")`, then `.set_adapter(task)`, on a model whose own task
    adapters are neutral (`neutralize_task_adapters`), so the update is not applied twice."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    base = unwrap_omnimamba(model)
    cfg = base.config
    folders = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}.")
        folder = os.path.join(output_dir, task)
        os.makedirs(folder, exist_ok=True)
        state = {}
        for name, proj in _in_projs(base):
            adapter = proj.task_adapters[task]
            state[f"base_model.model.{name}.lora_A.weight"] = adapter.down.weight.detach().cpu().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = adapter.up.weight.detach().cpu().contiguous()
        lora = LoraConfig(
            r=cfg.task_lora_rank,
            lora_alpha=cfg.task_lora_alpha,
            lora_dropout=cfg.task_lora_dropout,
            target_modules=TASK_ADAPTER_TARGET,
            bias="none",
            base_model_name_or_path=getattr(cfg, "_name_or_path", None) or None,
        )
        lora.save_pretrained(folder)
        save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(
                f"# OmniMamba built-in `{task}` task adapter\n\nLoRA r={cfg.task_lora_rank}, alpha={cfg.task_lora_alpha} "
                f"(scaling {cfg.task_lora_scaling}) on every `mixer.in_proj`, exported from the model's "
                f"`in_proj.task_adapters.{task}`. Apply it to an OmniMamba whose built-in adapters are neutralised "
                "(`omnimamba_hf.training.neutralize_task_adapters`).\n"
            )
        folders[task] = folder
    return folders


def neutralize_task_adapters(model: nn.Module, tasks: Sequence[str] = TASKS) -> None:
    """Zero the up-projection of the built-in task adapters (a no-op adapter, as at initialisation)."""
    with torch.no_grad():
        for _, proj in _in_projs(model):
            for task in tasks:
                proj.task_adapters[task].up.weight.zero_()


def import_task_adapters(model: nn.Module, adapter_dir: str, task: str) -> None:
    """Copy a PEFT LoRA adapter on the mixers' `in_proj` into the built-in `task` adapter. The rank must equal
    `config.task_lora_rank`; a different alpha is folded into the up-projection."""
    from safetensors.torch import load_file

    base = unwrap_omnimamba(model)
    cfg = base.config
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        peft_cfg = json.load(f)
    r, alpha = peft_cfg["r"], peft_cfg["lora_alpha"]
    if r != cfg.task_lora_rank:
        raise ValueError(f"Adapter rank {r} differs from the built-in task adapters' rank {cfg.task_lora_rank}.")
    if peft_cfg.get("use_rslora"):
        raise ValueError("rsLoRA adapters are not supported here.")
    factor = (alpha / r) / cfg.task_lora_scaling
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v for k, v in state.items()}
    with torch.no_grad():
        for name, proj in _in_projs(base):
            key = f"base_model.model.{name}"
            try:
                a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
            except KeyError as err:
                raise KeyError(f"The adapter in {adapter_dir} has no weights for {name}.") from err
            adapter = proj.task_adapters[task]
            adapter.down.weight.copy_(a.to(adapter.down.weight.dtype))
            adapter.up.weight.copy_((b * factor).to(adapter.up.weight.dtype))


__all__ = [
    "BYPASSED_TARGETS",
    "export_task_adapters",
    "get_omnimamba_lora_model",
    "import_task_adapters",
    "load_omnimamba_lora",
    "neutralize_task_adapters",
]
