"""OmniMamba (arXiv 2503.08686): one Mamba-2 backbone for image understanding (MMU) and text-to-image generation (T2I).

Module tree (names follow transformers' Mamba2 / Janus / LLaVA conventions; `conversion/` maps the original keys):

    OmniMambaForConditionalGeneration
      model: OmniMambaModel
        vision_model      DINOv2-reg ‖ SigLIP towers (MMU input)            — spec §2
        projector         fused-GELU MLP 2176 → 8704 → 2048 → 2048          — spec §2.3
        image_embeddings  VQ-code table + MLP (T2I input)                    — spec §3.5
        caption_mlp       MLP on T2I text-side embeddings                    — spec §3.5, §8 #5
        mmu_position_embeddings / t2i_position_embeddings (learned, added)   — spec §3.6
        language_model    embeddings, 48 × (RMSNorm → Mamba-2 mixer with task LoRA), norm_f — spec §3.2–3.4
        vqmodel           LlamaGen VQ-16 (T2I output pixels / training targets) — spec §6
      lm_head     (tied to language_model.embeddings)           text logits, 50288 wide   — spec §8 #1
      image_head  (tied to image_embeddings.embeddings, raw)    image logits, 16384 wide  — spec §8 #2

One id space: text ids `[0, V_text)`, image code k ↔ id `V_text + k`. The task of a call ("mmu" or "t2i", or one per
sample) selects the LoRA adapter, the position table, the embedding path of text ids (T2I text goes through
`caption_mlp`) and the output head.

This file is exported next to the weights for `trust_remote_code=True`: it only imports torch, transformers and its
siblings with a single dot.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.import_utils import is_torchdynamo_compiling

from .configuration_omnimamba import OmniMambaConfig
from .generation_omnimamba import _GRAPH_CACHES, OmniMambaGenerationMixin, omnimamba_generation_config
from .mixer_omnimamba import TASKS, OmniMambaMixer, OmniMambaRMSNorm, TaskRoute
from .vision_omnimamba import OmniMambaVisionModel
from .vq_omnimamba import OmniMambaVQVAE


# `trust_remote_code` export: these classes are copied next to the weights by `save_pretrained` (their files import
# only torch, transformers and each other with single-dot imports).
AUTO_MAP = {
    "AutoConfig": "configuration_omnimamba.OmniMambaConfig",
    "AutoModel": "modeling_omnimamba.OmniMambaModel",
    "AutoModelForImageTextToText": "modeling_omnimamba.OmniMambaForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_omnimamba.OmniMambaForConditionalGeneration",
}

# ---- outputs --------------------------------------------------------------------------------------------------------


@dataclass
class OmniMambaModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.Tensor` of shape `(batch, seq, hidden)`): output of the final norm.
    cache (`Cache`, *optional*): conv + SSM state of every Mamba layer (constant size).
    hidden_states (`tuple(torch.Tensor)`, *optional*): input of every block and the final output.
    image_hidden_states (`torch.Tensor`, *optional*): projected vision features scattered into the image slots.
    """

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None


@dataclass
class OmniMambaCausalLMOutput(ModelOutput):
    r"""
    loss (`torch.Tensor`, *optional*): next-token loss when `labels` are given: the token-mean cross-entropy of each
        task present in the batch, summed over tasks (the original's `loss_t2i + loss_mmu`, spec §4.6).
    logits (`torch.Tensor`): for a single-task call, the task's own head: text logits `(batch, seq, V_text)` for "mmu",
        image-code logits `(batch, seq, V_image)` for "t2i" (column k ↔ id `V_text + k`). For a call that mixes tasks per
        sample, logits over the whole id space `(batch, seq, V_text + V_image)`, `-inf` outside each row's vocabulary.
    cache (`Cache`, *optional*): conv + SSM state of every Mamba layer.
    hidden_states (`tuple(torch.Tensor)`, *optional*): see `OmniMambaModelOutput`.
    image_hidden_states (`torch.Tensor`, *optional*): projected vision features.
    mmu_loss / t2i_loss (`torch.Tensor`, *optional*): the per-task parts of `loss` (None for an absent task).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    mmu_loss: torch.Tensor | None = None
    t2i_loss: torch.Tensor | None = None


# ---- small modules --------------------------------------------------------------------------------------------------


class OmniMambaMLP(nn.Module):
    """Linear → GELU → Linear → GELU → Linear, all with bias, exact GELU: the original's "fused-gelu-mlp" projector,
    used both for vision features (§2.3) and after the image-code lookup (`project_in`, §3.5)."""

    def __init__(self, in_features: int, intermediate_size: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, intermediate_size)
        self.linear_2 = nn.Linear(intermediate_size, out_features)
        self.linear_3 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_3(F.gelu(self.linear_2(F.gelu(self.linear_1(x)))))


class OmniMambaImageEmbedding(nn.Module):
    """T2I input embedding of VQ codes: `mlp(embeddings(code))`. The image head is tied to the raw table, not to the
    MLP output (spec §8 #2)."""

    def __init__(self, config: OmniMambaConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.embeddings = nn.Embedding(config.image_vocab_size, hidden)
        self.mlp = OmniMambaMLP(hidden, config.image_embedding_intermediate_size, hidden)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embeddings(codes))


class OmniMambaCaptionMLP(nn.Module):
    """`fc2(GELU_tanh(fc1(e)))`, bias-free: applied to every text-side embedding of a T2I sequence (spec §3.5, §8 #5)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.fc2 = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class OmniMambaBlock(GradientCheckpointingLayer):
    """Prenorm block without MLP: `mixer(norm(residual))`; the residual stream is float32 (spec §3.2)."""

    def __init__(self, config: OmniMambaConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.norm = OmniMambaRMSNorm(text.hidden_size, eps=text.layer_norm_epsilon)
        self.mixer = OmniMambaMixer(
            text, layer_idx, config.task_lora_rank, config.task_lora_alpha, config.task_lora_dropout, state_config=config
        )

    def forward(self, residual, hidden_dtype, task, cache=None, attention_mask=None):
        return self.mixer(self.norm(residual, hidden_dtype), task, cache, attention_mask)


class OmniMambaTextModel(nn.Module):
    """The Mamba-2 language backbone: text embeddings, blocks, final norm. Takes already-assembled input embeddings."""

    def __init__(self, config: OmniMambaConfig):
        super().__init__()
        text = config.text_config
        self.embeddings = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(OmniMambaBlock(config, i) for i in range(text.num_hidden_layers))
        self.norm_f = OmniMambaRMSNorm(text.hidden_size, eps=text.layer_norm_epsilon)

    def forward(self, inputs_embeds, task, cache=None, attention_mask=None, output_hidden_states=False):
        dtype = inputs_embeds.dtype
        residual = inputs_embeds.to(torch.promote_types(dtype, torch.float32))  # residual_in_fp32 (spec §3.2)
        all_hidden = (inputs_embeds,) if output_hidden_states else None
        for layer in self.layers:
            out = layer(residual, dtype, task, cache, attention_mask)
            residual = residual + out
            if output_hidden_states:
                all_hidden += (residual.to(dtype),)
        hidden = self.norm_f(residual, dtype)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        return hidden, all_hidden


# ---- pre-trained base -----------------------------------------------------------------------------------------------


class OmniMambaPreTrainedModel(PreTrainedModel):
    config: OmniMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    output_modalities = ("image", "text")  # pipeline("any-to-any") may ask for generation_mode="image"
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "OmniMambaBlock",
        "Dinov2WithRegistersLayer",
        "SiglipEncoderLayer",
        "SiglipMultiheadAttentionPoolingHead",
        "JanusVQVAEResnetBlock",
        "JanusVQVAEAttnBlock",
    ]
    _skip_keys_device_placement = ["cache"]
    _is_stateful = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # Trainer: the loss is a per-task token mean (original semantics), not a sum to be divided by num_items_in_batch.
    accepts_loss_kwargs = False

    def __getstate__(self):
        """Captured CUDA graphs and static decode buffers (generation_omnimamba._GRAPH_CACHES) are not model state:
        deepcopy / pickle leave them behind (the copy rebuilds its own on first use)."""
        state = dict(super().__getstate__())
        for key in _GRAPH_CACHES:
            state.pop(key, None)
        return state

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes this package's modeling files and an `auto_map`, so that the directory (or a Hub repo made from
        it) loads with `trust_remote_code=True` where `omnimamba_hf` is not installed."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        text = self.config.text_config
        std = self.config.initializer_range
        if isinstance(module, OmniMambaMixer):
            # mamba-ssm 2.2.2 init (spec §1.8): A = U[1, 16], dt log-uniform in [dt_min, dt_max] floored, D = 1
            init.copy_(module.A_log, torch.log(torch.empty_like(module.A_log).uniform_(1, 16)))
            dt = torch.exp(
                torch.rand_like(module.dt_bias) * (math.log(text.time_step_max) - math.log(text.time_step_min))
                + math.log(text.time_step_min)
            ).clamp(min=text.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            init.ones_(module.D)
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            # out_proj: kaiming-uniform / sqrt(n_layer) (the original's _init_weights re-draw)
            init.copy_(
                module.out_proj.weight,
                nn.init.kaiming_uniform_(torch.empty_like(module.out_proj.weight), a=math.sqrt(5))
                / math.sqrt(text.num_hidden_layers),
            )
            # Task adapters are initialised here, not in a branch of their own: transformers skips custom modules
            # that hold no parameters directly (the adapter's are in its two Linear children).
            for adapter in module.in_proj.task_adapters.values():
                init.kaiming_uniform_(adapter.down.weight, a=math.sqrt(5))
                init.zeros_(adapter.up.weight)  # a fresh adapter is a no-op (spec §1.8)
        elif isinstance(module, OmniMambaModel):
            init.trunc_normal_(module.mmu_position_embeddings, std=std)
            init.trunc_normal_(module.t2i_position_embeddings, std=std)
        elif "RMSNorm" in module.__class__.__name__:
            init.ones_(module.weight)


# ---- base model -----------------------------------------------------------------------------------------------------


def _check(condition, message) -> None:
    """Input validation that is skipped under torch.compile / CUDA-graph capture (no host syncs there). `condition`
    and `message` may be callables, evaluated only when needed (a message that reads tensor values costs syncs)."""
    if is_torchdynamo_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    if not (condition() if callable(condition) else condition):
        raise ValueError(message() if callable(message) else message)


class OmniMambaModel(OmniMambaPreTrainedModel):
    r"""
    The OmniMamba backbone without output heads: assembles input embeddings for either task (text/caption/image-code
    embeddings, vision features in the image slots, the task's position table) and runs the Mamba-2 stack.

    Example:

    ```python
    >>> from omnimamba_hf import OmniMambaConfig, OmniMambaModel
    >>> model = OmniMambaModel(OmniMambaConfig(text_config={"num_hidden_layers": 2}))  # doctest: +SKIP
    ```
    """

    _auto_class = "AutoModel"  # copy the code files on save (see AUTO_MAP)

    def __init__(self, config: OmniMambaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.vision_model = OmniMambaVisionModel(config.vision_config)
        self.projector = OmniMambaMLP(config.vision_config.hidden_size, config.projector_intermediate_size, hidden)
        self.image_embeddings = OmniMambaImageEmbedding(config)
        self.caption_mlp = OmniMambaCaptionMLP(hidden)
        # Shapes as in the original ([1, rows, hidden]) so the key table maps 1:1 (spec Appendix A).
        self.mmu_position_embeddings = nn.Parameter(torch.zeros(1, config.mmu_max_position_embeddings, hidden))
        self.t2i_position_embeddings = nn.Parameter(torch.zeros(1, config.t2i_max_position_embeddings, hidden))
        self.mmu_position_embeddings._no_weight_decay = True
        self.t2i_position_embeddings._no_weight_decay = True
        self.language_model = OmniMambaTextModel(config)
        self.vqmodel = OmniMambaVQVAE._from_config(config.vq_config)
        self.vqmodel.requires_grad_(False)  # the VQ tokenizer is always frozen (spec §1.1, §7.2)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embeddings

    def set_input_embeddings(self, value):
        self.language_model.embeddings = value

    # -- task routing -----------------------------------------------------------------------------------------------

    def resolve_task(self, task, batch_size: int, device) -> TaskRoute:
        """"mmu" / "t2i" for the whole batch, or one per sample (a list of names, or a LongTensor of indices into
        `TASKS`); a per-sample list whose entries are all equal collapses to the single-task fast path."""
        if isinstance(task, str):
            if task not in TASKS:
                raise ValueError(f"Unknown task {task!r}: use one of {TASKS} (or one per sample).")
            return task
        if isinstance(task, torch.Tensor):
            route = task.to(device=device, dtype=torch.long).view(-1)
        else:
            names = list(task)
            unknown = sorted({t for t in names if t not in TASKS})
            if unknown:
                raise ValueError(f"Unknown task(s) {unknown}: use {TASKS}.")
            if len(set(names)) == 1 and len(names) == batch_size:
                return names[0]
            route = torch.tensor([TASKS.index(t) for t in names], device=device)
        if route.numel() != batch_size:
            raise ValueError(f"Got {route.numel()} per-sample tasks for a batch of {batch_size}.")
        _check(lambda: bool(((route >= 0) & (route < len(TASKS))).all()), f"Task indices must be in [0, {len(TASKS)}).")
        return route

    # -- embeddings ---------------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(n_images, 2, 3, S, S)` pixels → projected patch features `(n_images, num_image_tokens, hidden)`."""
        dtype = self.projector.linear_1.weight.dtype
        return self.projector(self.vision_model(pixel_values.to(dtype)))

    def embed_tokens(self, input_ids: torch.LongTensor, task: TaskRoute) -> torch.Tensor:
        """Embeddings of ids in the shared id space: text ids through the text table (then `caption_mlp` in T2I rows),
        image ids through the image-code table + MLP."""
        V = self.config.text_vocab_size
        _check(
            lambda: bool(((input_ids >= 0) & (input_ids < V + self.config.image_vocab_size)).all()),
            lambda: f"input_ids must be in [0, {V + self.config.image_vocab_size}): text ids below {V}, image ids "
            f"{V} + code. Got min {int(input_ids.min())}, max {int(input_ids.max())}.",
        )
        is_image = input_ids >= V
        embeds = self.language_model.embeddings(input_ids.masked_fill(is_image, 0))
        if task == "t2i":
            caption = ~is_image
        elif task == "mmu":
            caption = None
        else:
            caption = ~is_image & (task == TASKS.index("t2i"))[:, None]
        if caption is not None and (is_torchdynamo_compiling() or bool(caption.any())):
            embeds = embeds.index_put((caption,), self.caption_mlp(embeds[caption]).to(embeds.dtype))
        if is_torchdynamo_compiling() or bool(is_image.any()):
            codes = input_ids[is_image] - V
            embeds = embeds.index_put((is_image,), self.image_embeddings(codes).to(embeds.dtype))
        return embeds

    def add_position_embeddings(self, embeds: torch.Tensor, position_ids: torch.LongTensor, task: TaskRoute):
        """Add the task's learned absolute position table (spec §3.6); positions count image slots too."""
        tables = {"mmu": self.mmu_position_embeddings[0], "t2i": self.t2i_position_embeddings[0]}
        for index, (name, table) in enumerate(tables.items()):
            if isinstance(task, str):
                rows = position_ids if task == name else None
            else:
                rows = position_ids[task == index]
            if rows is not None and rows.numel():
                _check(
                    lambda: bool((rows >= 0).all() and (rows < table.shape[0]).all()),
                    lambda: f"Position {int(rows.max())} is past the {name.upper()} position table ({table.shape[0]} rows): "
                    f"{name} sequences hold at most {table.shape[0]} positions, image slots included. Shorten the "
                    "prompt or max_new_tokens.",
                )
        if isinstance(task, str):
            return embeds + tables[task][position_ids].to(embeds.dtype)
        is_t2i = (task == TASKS.index("t2i"))[:, None, None]
        mmu = tables["mmu"][position_ids.clamp(max=tables["mmu"].shape[0] - 1)]
        t2i = tables["t2i"][position_ids.clamp(max=tables["t2i"].shape[0] - 1)]
        return embeds + torch.where(is_t2i, t2i, mmu).to(embeds.dtype)

    def _scatter_image_features(self, input_ids, inputs_embeds, pixel_values, image_flags, image_features=None):
        """Put the projected features of each image into its `num_image_tokens` placeholder slots. A slot flagged
        empty (`image_flags` False) gets zeros: the original's layout for text-only samples (spec §4.3, §8 #8)."""
        n_tok = self.config.num_image_tokens
        slots = input_ids == self.config.image_token_id
        n_slots_total = int(slots.sum())
        if n_slots_total % n_tok:
            raise ValueError(
                f"Found {n_slots_total} image placeholder tokens (id {self.config.image_token_id}), not a multiple of "
                f"num_image_tokens={n_tok}: each image needs exactly {n_tok} placeholders (the processor inserts them)."
            )
        n_images = n_slots_total // n_tok
        flags = (
            torch.ones(n_images, dtype=torch.bool, device=inputs_embeds.device)
            if image_flags is None
            else image_flags.to(device=inputs_embeds.device, dtype=torch.bool).view(-1)
        )
        if flags.numel() != n_images:
            raise ValueError(f"image_flags has {flags.numel()} entries but the text holds {n_images} image(s).")
        n_real = int(flags.sum())
        n_pixels = 0 if pixel_values is None else pixel_values.shape[0]
        if n_real != n_pixels:
            if pixel_values is None:
                raise ValueError(
                    f"The input holds {n_real} image(s) (placeholder tokens) but no pixel_values were given. Pass the "
                    "images through the processor, or, for the original's text-only layout, image_flags=False."
                )
            raise ValueError(f"The input holds {n_real} image(s) but pixel_values has {n_pixels}.")
        if n_images == 0:
            return inputs_embeds, None
        features = inputs_embeds.new_zeros(n_images, n_tok, inputs_embeds.shape[-1])
        if n_real:
            if image_features is None:
                image_features = self.get_image_features(pixel_values)
            features = features.index_put((flags,), image_features.to(inputs_embeds.dtype))
        mask = slots[..., None].expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features), features

    def build_inputs_embeds(
        self, input_ids, pixel_values=None, image_flags=None, position_ids=None, task: TaskRoute = "mmu",
        inputs_embeds=None, image_features=None, generated_ids=False,
    ):  # fmt: skip
        """What the Mamba stack consumes: token / caption / image-code embeddings, the projected vision features in
        the image slots (`image_features` if already computed, e.g. by a CUDA graph), plus the task's position table
        (`position_ids` default `0 … seq-1`). Returns `(inputs_embeds, image_hidden_states)`. With `generated_ids`
        (tokens fed back during decoding, no images) the placeholder id is an ordinary token: the MMU head covers it,
        so sampling can choose it, and the original feeds back whatever it samples."""
        image_hidden_states = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids, task)
            if not generated_ids:
                inputs_embeds, image_hidden_states = self._scatter_image_features(
                    input_ids, inputs_embeds, pixel_values, image_flags, image_features
                )
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their placeholders say where the image goes).")
        if position_ids is None:
            batch, seq_len = inputs_embeds.shape[:2]
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).expand(batch, -1)
        return self.add_position_embeddings(inputs_embeds, position_ids, task), image_hidden_states

    @can_return_tuple
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # transformers 5.24's rename
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_flags: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        task: str | list[str] | torch.Tensor = "mmu",
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> OmniMambaModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): ids in the shared id space (text ids, image placeholder
            `config.image_token_id` repeated `num_image_tokens` times per image, image-code ids `V_text + k`).
        pixel_values (`torch.FloatTensor` of shape `(n_images, 2, 3, S, S)`, *optional*): the images of the batch in
            order, as `OmniMambaImageProcessor` returns them.
        image_flags (`torch.BoolTensor` of shape `(n_slots,)`, *optional*): per image slot, False for an empty slot
            filled with zero features (the original's text-only layout). Default: every slot holds a real image.
        position_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): indices into the task's position table;
            default `0 … seq-1` (required when continuing from `cache`).
        task (`str`, `list[str]` or `torch.LongTensor`, defaults to `"mmu"`): `"mmu"` or `"t2i"` for the whole batch,
            or one per sample.
        inputs_embeds (`torch.FloatTensor`, *optional*): already-embedded tokens (after the task's embedding path);
            position embeddings are still added.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        batch, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        route = self.resolve_task(task, batch, device)
        use_cache = use_cache if use_cache is not None else (cache is not None or not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        if not use_cache:
            cache = None

        continuing = cache is not None and cache.has_previous_state()
        if continuing:
            if position_ids is None:
                raise ValueError(
                    "position_ids are required when continuing from cache (the learned position tables need the "
                    "absolute position of each new token)."
                )
            # several new tokens at once (not a decode step: no host sync per token)
            if seq_len > 1 and not is_torchdynamo_compiling() and bool((position_ids == 0).any()):
                # e.g. generate(input_ids=whole conversation, cache=out.cache): the state already holds the start
                raise ValueError(
                    "The cache already holds the start of the sequence, but position 0 is fed again. Feed only the "
                    "new tokens: generate(input_ids=new_tokens, attention_mask=mask over cached + new tokens, "
                    "cache=cache), or position_ids that continue the cached positions."
                )
        # continuing from a state without images: the new ids were generated, placeholders included (see above)
        generated_ids = pixel_values is None and continuing
        inputs_embeds, image_hidden_states = self.build_inputs_embeds(
            input_ids, pixel_values, image_flags, position_ids, route, inputs_embeds=inputs_embeds,
            generated_ids=generated_ids,
        )
        if attention_mask is not None and not is_torchdynamo_compiling():
            right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            if bool(attention_mask.all()) or (cache is None and right_padded):
                # nothing padded, or only trailing padding with no state to keep: real positions cannot see the pads
                # (causal), so the masking multiplies are skipped (and the fused training kernel can run)
                attention_mask = None

        hidden, all_hidden = self.language_model(
            inputs_embeds, route, cache, attention_mask, bool(output_hidden_states)
        )
        return OmniMambaModelOutput(
            last_hidden_state=hidden,
            cache=cache,
            hidden_states=all_hidden,
            image_hidden_states=image_hidden_states,
        )


# ---- heads + generation ---------------------------------------------------------------------------------------------


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's loss (spec §4.6): logits[:, :-1] vs labels[:, 1:], token mean, ignore index -100."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class OmniMambaForConditionalGeneration(OmniMambaPreTrainedModel, OmniMambaGenerationMixin):
    r"""
    OmniMamba with its two output heads: `lm_head` (text, tied to the text embedding) and `image_head` (VQ codes, tied
    to the raw image-code table). `generate()` produces text (MMU); `generate(..., generation_mode="image")` produces
    256 image tokens (T2I) that `decode_image_tokens()` turns into pixels.

    Example:

    ```python
    >>> from omnimamba_hf import OmniMambaForConditionalGeneration
    >>> model = OmniMambaForConditionalGeneration.from_pretrained("hustvl/OmniMamba")  # doctest: +SKIP
    ```
    """

    _auto_class = "AutoModelForImageTextToText"  # copy the code files on save (see AUTO_MAP)
    _tied_weights_keys = {
        "lm_head.weight": "model.language_model.embeddings.weight",
        "image_head.weight": "model.image_embeddings.embeddings.weight",
    }

    def __init__(self, config: OmniMambaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.model = OmniMambaModel(config)
        # 50288 outputs (the padded table), not the original's nominal 50277 (spec §8 #1, #24)
        self.lm_head = nn.Linear(hidden, config.text_vocab_size, bias=False)
        self.image_head = nn.Linear(hidden, config.image_vocab_size, bias=False)
        self.post_init()
        self.generation_config = omnimamba_generation_config(config)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compute_logits(self, hidden: torch.Tensor, task: TaskRoute) -> torch.Tensor:
        """The task's head; for per-sample tasks, logits over the whole id space with -inf outside each row's range."""
        if task == "mmu":
            return self.lm_head(hidden)
        if task == "t2i":
            return self.image_head(hidden)
        text = self.lm_head(hidden)
        image = self.image_head(hidden)
        is_t2i = (task == TASKS.index("t2i"))[:, None, None]
        neg = torch.finfo(text.dtype).min
        return torch.cat(
            [text.masked_fill(is_t2i, neg), image.masked_fill(~is_t2i, neg)], dim=-1
        )

    def compute_loss(self, hidden: torch.Tensor, labels: torch.Tensor, task: TaskRoute):
        """Sum over tasks of each task's token-mean cross-entropy (spec §4.6). Labels are ids in the shared id space."""
        V = self.config.text_vocab_size
        losses = {}
        for index, name in enumerate(TASKS):
            if isinstance(task, str):
                rows = slice(None) if task == name else None
            else:
                rows = (task == index).nonzero().view(-1)
                rows = rows if rows.numel() else None
            if rows is None:
                continue
            h, y = hidden[rows], labels[rows]
            supervised = y != -100
            if name == "t2i":
                _check(
                    lambda: bool(((y[supervised] >= V) & (y[supervised] < V + self.config.image_vocab_size)).all()),
                    f"T2I labels must be image ids in [{V}, {V + self.config.image_vocab_size}) or -100.",
                )
                y = torch.where(supervised, y - V, -100)
                logits = self.image_head(h)
            else:
                _check(
                    lambda: bool((y[supervised] < V).all()),
                    f"MMU labels must be text ids below {V} or -100 (image ids in the labels: a T2I batch needs "
                    "task='t2i').",
                )
                logits = self.lm_head(h)
            losses[name] = _shifted_cross_entropy(logits, y)
        loss = sum(losses.values())
        return loss, losses.get("mmu"), losses.get("t2i")

    @can_return_tuple
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # transformers 5.24's rename
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_flags: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        task: str | list[str] | torch.Tensor = "mmu",
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OmniMambaCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): target ids in the shared id space (text ids for
            MMU rows, image ids `V_text + k` for T2I rows), -100 where not supervised; shifted inside (spec §4.6).
        logits_to_keep (`int` or `torch.Tensor`, *optional*): keep only the last N positions' logits (0 = all).
        task, pixel_values, image_flags, position_ids: see `OmniMambaModel.forward`.
        """
        if any(name in kwargs for name in TASKS):
            raise ValueError(
                f"Got per-task sub-batches {[n for n in TASKS if n in kwargs]} (OmniMambaDataCollator's output): train "
                "on them with OmniMambaTrainer, or call the model once per sub-batch with its task: "
                "model(**batch['t2i'], task='t2i')."
            )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_flags=image_flags,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            task=task,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        batch = hidden.shape[0]
        route = self.model.resolve_task(task, batch, hidden.device)
        loss = mmu_loss = t2i_loss = None
        if labels is not None:
            loss, mmu_loss, t2i_loss = self.compute_loss(hidden, labels, route)
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.compute_logits(kept, route)
        return OmniMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
            mmu_loss=mmu_loss,
            t2i_loss=t2i_loss,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        use_cache=None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            # The recurrent state already holds the prompt (padding was zeroed at prefill); images are consumed.
            model_inputs["attention_mask"] = None
            model_inputs["pixel_values"] = None
            model_inputs["image_flags"] = None
        return model_inputs


__all__ = [
    "OmniMambaPreTrainedModel",
    "OmniMambaModel",
    "OmniMambaForConditionalGeneration",
    "OmniMambaModelOutput",
    "OmniMambaCausalLMOutput",
]
