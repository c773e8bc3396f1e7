"""Configuration classes for OmniMamba (arXiv 2503.08686).

The defaults reproduce the released OmniMamba-1.3B model (ORIGINAL-SPEC §0, §1.3, §2.1, §6.1). Tiny configurations
for tests are built by passing smaller sub-config dicts; a sub-config dict is merged over the OmniMamba defaults
(not over the generic transformers defaults, which differ: e.g. SigLIP's tanh-GELU, Mamba2's 8 groups).

This file is exported next to the weights for `trust_remote_code=True` loading: it only imports transformers and
its siblings with a single dot.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Dinov2WithRegistersConfig, JanusVQVAEConfig, Mamba2Config, PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

# dtype of the SSM recurrent state while generating: float32 (default), or the model's own dtype (as the original)
SSM_STATE_DTYPES = ("float32", "model")

# ---- defaults of the released 1.3B model --------------------------------------------------------------------------

TEXT_DEFAULTS = {
    # Mamba-2 1.3B: d_model 2048, 48 layers, d_state 128, d_conv 4, expand 2, headdim 64 (64 heads), 1 group (§1.3)
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "state_size": 128,
    "conv_kernel": 4,
    "expand": 2,
    "head_dim": 64,
    "num_heads": 64,
    "n_groups": 1,
    "chunk_size": 256,
    # 50277 GPT-NeoX ids + [PAD] + 9 task tokens = 50287, padded to a multiple of 16 (§1.4)
    "vocab_size": 50288,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": True,
    "use_bias": False,
    "use_conv_bias": True,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_limit": (0.0, float("inf")),
    "pad_token_id": 50277,
    "bos_token_id": None,
    "eos_token_id": 0,
    "tie_word_embeddings": True,
}

DINO_DEFAULTS = {
    # timm vit_large_patch14_reg4_dinov2 at img_size 384 (§2.1)
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 384,
    "patch_size": 14,
    "num_register_tokens": 4,
    "layerscale_value": 1.0,
    "qkv_bias": True,
}

SIGLIP_DEFAULTS = {
    # timm vit_so400m_patch14_siglip_384 (§2.1); exact GELU, not transformers' tanh default (§9.2)
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}


def _merged(defaults: dict, value):
    """A sub-config given as a dict is read as overrides of the OmniMamba defaults."""
    if value is None:
        return dict(defaults)
    if isinstance(value, dict):
        return {**defaults, **value}
    return value


@strict
class OmniMambaVisionConfig(PreTrainedConfig):
    r"""
    Configuration of OmniMamba's understanding (MMU) vision encoder: a DINOv2-with-registers tower and a SigLIP tower
    that see the same image at 384 px; the patch features of one intermediate block of each are concatenated
    (DINOv2 channels first).

    dino_config (`dict` or `Dinov2WithRegistersConfig`, *optional*): the DINOv2-L/14-reg4 tower.
    siglip_config (`dict` or `SiglipVisionConfig`, *optional*): the SigLIP-SO400M/14-384 tower.
    dino_feature_layer (`int`, *optional*, defaults to -2): index of the block whose output is taken (-2: the
        second-to-last block, i.e. block 22 of 24), before the final norm; prefix (class + register) tokens dropped.
    siglip_feature_layer (`int`, *optional*, defaults to -2): the same for SigLIP (block 25 of 27).
    dino_image_mean / dino_image_std, siglip_image_mean / siglip_image_std: the per-tower normalisations (§2.2).

    Example:

    ```python
    >>> from omnimamba_hf import OmniMambaVisionConfig
    >>> config = OmniMambaVisionConfig()
    >>> config.hidden_size
    2176
    ```
    """

    model_type = "omnimamba_vision"
    base_config_key = "vision_config"
    sub_configs_defaults = {
        "dino_config": SubConfigSpec(config_class=Dinov2WithRegistersConfig, init_kwargs=DINO_DEFAULTS),
        "siglip_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=SIGLIP_DEFAULTS),
    }

    dino_config: dict | PreTrainedConfig | None = None
    siglip_config: dict | PreTrainedConfig | None = None
    dino_feature_layer: int = -2
    siglip_feature_layer: int = -2
    dino_image_mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406)
    dino_image_std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225)
    siglip_image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5)
    siglip_image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5)
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.dino_config = _merged(DINO_DEFAULTS, self.dino_config)
        self.siglip_config = _merged(SIGLIP_DEFAULTS, self.siglip_config)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        dino, siglip = self.dino_config, self.siglip_config
        if dino.image_size != siglip.image_size or dino.patch_size != siglip.patch_size:
            raise ValueError(
                "The DINOv2 and SigLIP towers must see the same image size and patch size (their patch grids are "
                f"concatenated); got {dino.image_size}/{dino.patch_size} and {siglip.image_size}/{siglip.patch_size}."
            )
        for name, layer, depth in (
            ("dino_feature_layer", self.dino_feature_layer, dino.num_hidden_layers),
            ("siglip_feature_layer", self.siglip_feature_layer, siglip.num_hidden_layers),
        ):
            if not -depth <= layer < depth:
                raise ValueError(f"{name}={layer} is outside a tower of {depth} blocks.")

    @property
    def hidden_size(self) -> int:
        """Width of the fused (DINOv2 ‖ SigLIP) patch feature."""
        return self.dino_config.hidden_size + self.siglip_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.siglip_config.image_size

    @property
    def num_patches(self) -> int:
        """Patches per image: (image_size // patch_size)², 729 at 384 px (the right/bottom 6 px are never seen)."""
        return (self.siglip_config.image_size // self.siglip_config.patch_size) ** 2


@strict
class OmniMambaVQVAEConfig(JanusVQVAEConfig):
    r"""
    Configuration of the LlamaGen VQ-16 image tokenizer (ORIGINAL-SPEC §6): the same architecture as transformers'
    Janus VQ-VAE, with a 16×16 token grid for 256×256 images and LlamaGen's L2-normalised nearest-code rule for encode.

    num_patches (`int`, *optional*, defaults to 16): side of the token grid (256 px / 16).
    image_size (`int`, *optional*, defaults to 256): pixel side of a generated image.

    Example:

    ```python
    >>> from omnimamba_hf import OmniMambaVQVAEConfig
    >>> OmniMambaVQVAEConfig().num_embeddings
    16384
    ```
    """

    model_type = "omnimamba_vqgan"
    base_config_key = "vq_config"
    num_patches: int = 16
    image_size: int = 256


@strict
class OmniMambaConfig(PreTrainedConfig):
    r"""
    Configuration of an OmniMamba model: a Mamba-2 language backbone shared by two tasks, multimodal understanding
    (MMU: image + text → text) and text-to-image generation (T2I: text → 256 VQ image tokens), with decoupled
    vocabularies and task-specific LoRA on every mixer's `in_proj`.

    **Id space.** Text ids are `[0, text_vocab_size)`; image token `k` of the VQ codebook has id
    `text_vocab_size + k`, so one sequence can hold both (the processor uses the same convention).

    text_config (`dict` or `Mamba2Config`, *optional*): the Mamba-2 backbone (1.3B: 48 × d_model 2048).
    vision_config (`dict` or `OmniMambaVisionConfig`, *optional*): the MMU vision encoder.
    vq_config (`dict` or `OmniMambaVQVAEConfig`, *optional*): the LlamaGen VQ-16 tokenizer.
    projector_intermediate_size (`int`, *optional*, defaults to 8704): hidden width of the fused-GELU MLP projector
        (vision 2176 → 8704 → d_model → d_model).
    image_embedding_intermediate_size (`int`, *optional*, defaults to 8192): hidden width of the MLP applied after the
        image-token lookup (d_model → 8192 → d_model → d_model).
    num_image_tokens (`int`, *optional*, defaults to 729): image placeholder slots per MMU image (27 × 27 patches).
    mmu_max_position_embeddings (`int`, *optional*, defaults to 1500): rows of the MMU position table.
    t2i_max_position_embeddings (`int`, *optional*, defaults to 329): rows of the T2I position table (72 prompt + 256
        image + `<|eoi|>`).
    t2i_caption_length (`int`, *optional*, defaults to 68): caption slots in the fixed T2I prompt.
    task_lora_rank / task_lora_alpha / task_lora_dropout: the task adapters on `in_proj` (8, 32 → scaling 4, 0.05).
    image_token_id (`int`, *optional*, defaults to 50287): placeholder id the processor repeats `num_image_tokens` times
        where an image's features go (the last, otherwise unused, row of the padded text embedding).
    pad_token_id, eos_token_id, soi/eoi/sot/eot/t2i/mmu_token_id: special ids (ORIGINAL-SPEC §0).
    ssm_state_dtype (`str`, *optional*, defaults to `"float32"`): dtype of the SSM recurrent state kept while
        generating. `"float32"` (float64 for a float64 model) is more accurate than the original; `"model"` keeps it
        in the model's dtype, as the original's CUDA-graph decode (ORIGINAL-SPEC §5.3) and transformers' Mamba2 do.
        In bfloat16 that halves the state's memory and the traffic that bounds decoding at large batches
        (docs/BENCHMARKS.md). Read when a cache, prefill or decoder is created; may be changed between calls.

    Example:

    ```python
    >>> from omnimamba_hf import OmniMambaConfig, OmniMambaForConditionalGeneration
    >>> config = OmniMambaConfig()            # the released 1.3B layout
    >>> config.text_vocab_size, config.image_vocab_size
    (50288, 16384)
    ```
    """

    model_type = "omnimamba"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=Mamba2Config, init_kwargs=TEXT_DEFAULTS),
        "vision_config": OmniMambaVisionConfig,
        "vq_config": OmniMambaVQVAEConfig,
    }
    keys_to_ignore_at_inference = ["cache", "image_hidden_states"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vq_config: dict | PreTrainedConfig | None = None
    projector_intermediate_size: int = 8704
    image_embedding_intermediate_size: int = 8192
    num_image_tokens: int = 729
    mmu_max_position_embeddings: int = 1500
    t2i_max_position_embeddings: int = 329
    t2i_caption_length: int = 68
    task_lora_rank: int = 8
    task_lora_alpha: float | int = 32
    task_lora_dropout: float | int = 0.05
    image_token_id: int = 50287
    pad_token_id: int | None = 50277
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    soi_token_id: int = 50278
    eoi_token_id: int = 50279
    sot_token_id: int = 50280
    eot_token_id: int = 50281
    t2i_token_id: int = 50282
    mmu_token_id: int = 50283
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    ssm_state_dtype: str = "float32"

    def __post_init__(self, **kwargs):
        self.text_config = _merged(TEXT_DEFAULTS, self.text_config)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        text = self.text_config
        if self.ssm_state_dtype not in SSM_STATE_DTYPES:
            raise ValueError(f"ssm_state_dtype must be one of {SSM_STATE_DTYPES}, got {self.ssm_state_dtype!r}.")
        if text.hidden_size * text.expand != text.num_heads * text.head_dim:
            raise ValueError(
                f"text_config: hidden_size * expand ({text.hidden_size * text.expand}) must equal "
                f"num_heads * head_dim ({text.num_heads * text.head_dim})."
            )
        ids = {name: getattr(self, name) for name in self.special_token_names()}
        for name, value in ids.items():
            if value is not None and not 0 <= value < text.vocab_size:
                raise ValueError(f"{name}={value} is outside the text vocabulary [0, {text.vocab_size}).")
        if self.num_image_tokens != self.vision_config.num_patches:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} but the vision towers produce "
                f"{self.vision_config.num_patches} patches per image."
            )
        prompt_len = self.t2i_caption_length + 4
        if self.t2i_max_position_embeddings < prompt_len + self.num_generated_image_tokens:
            raise ValueError(
                f"t2i_max_position_embeddings={self.t2i_max_position_embeddings} cannot hold a {prompt_len}-token "
                f"prompt and {self.num_generated_image_tokens} image tokens."
            )

    @staticmethod
    def special_token_names() -> tuple[str, ...]:
        return (
            "image_token_id",
            "pad_token_id",
            "eos_token_id",
            "soi_token_id",
            "eoi_token_id",
            "sot_token_id",
            "eot_token_id",
            "t2i_token_id",
            "mmu_token_id",
        )

    # ---- derived quantities (not stored) ----------------------------------------------------------------------------

    @property
    def text_vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def image_vocab_size(self) -> int:
        return self.vq_config.num_embeddings

    @property
    def image_token_offset(self) -> int:
        """Id of image code 0 in the shared id space."""
        return self.text_config.vocab_size

    @property
    def num_generated_image_tokens(self) -> int:
        """Image tokens per generated image: the VQ grid, 16 × 16 = 256."""
        return self.vq_config.num_patches**2

    @property
    def t2i_prompt_length(self) -> int:
        """`<|t2i|> <|sot|>` + caption slots + `<|eot|> <|soi|>` (72 for the released model)."""
        return self.t2i_caption_length + 4

    @property
    def task_lora_scaling(self) -> float:
        return self.task_lora_alpha / self.task_lora_rank


__all__ = ["OmniMambaConfig", "OmniMambaVisionConfig", "OmniMambaVQVAEConfig"]
