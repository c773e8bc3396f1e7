"""omnimamba-hf: the Hugging Face-native home of OmniMamba (arXiv 2503.08686).

Importing the package registers OmniMamba with the transformers Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoImageProcessor, AutoProcessor).
"""

from .modeling import (
    OmniMambaCausalLMOutput,
    OmniMambaConfig,
    OmniMambaForConditionalGeneration,
    OmniMambaModel,
    OmniMambaModelOutput,
    OmniMambaPreTrainedModel,
    OmniMambaVisionConfig,
    OmniMambaVQVAEConfig,
)

__version__ = "0.1.0"


def register() -> None:
    """Register the OmniMamba classes with the transformers Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM

    AutoConfig.register("omnimamba", OmniMambaConfig, exist_ok=True)
    AutoConfig.register("omnimamba_vision", OmniMambaVisionConfig, exist_ok=True)
    AutoConfig.register("omnimamba_vqgan", OmniMambaVQVAEConfig, exist_ok=True)
    AutoModel.register(OmniMambaConfig, OmniMambaModel, exist_ok=True)
    AutoModelForImageTextToText.register(OmniMambaConfig, OmniMambaForConditionalGeneration, exist_ok=True)
    AutoModelForMultimodalLM.register(OmniMambaConfig, OmniMambaForConditionalGeneration, exist_ok=True)
    try:
        from .processing import register_processing
    except ImportError:  # processing not importable (should not happen in an installed package)
        return
    register_processing()


register()

__all__ = [
    "OmniMambaConfig",
    "OmniMambaVisionConfig",
    "OmniMambaVQVAEConfig",
    "OmniMambaPreTrainedModel",
    "OmniMambaModel",
    "OmniMambaForConditionalGeneration",
    "OmniMambaModelOutput",
    "OmniMambaCausalLMOutput",
    "register",
]
