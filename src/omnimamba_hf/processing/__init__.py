"""OmniMamba processing: tokenizer helpers, image processor, processor and chat template (ORIGINAL-SPEC §1.4, §2.2, §4)."""

from .image_processing_omnimamba import MAX_IMAGE_PIXELS, OmniMambaImageProcessor, load_image
from .processing_omnimamba import OmniMambaProcessor, OmniMambaProcessorKwargs
from .tokenization_omnimamba import (
    TOKEN_NAMES,
    build_omnimamba_tokenizer,
    check_tokenizer_matches_config,
    special_token_ids,
)


def register_processing() -> None:
    """Register `OmniMambaImageProcessor` and `OmniMambaProcessor` for `OmniMambaConfig` with the Auto classes.

    The image processor is pure PIL/numpy, so it is registered for both backend names ("pil", "torchvision"): the
    same numerics whichever backend transformers asks for, and no fallback warning when torchvision is installed.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    from ..modeling.configuration_omnimamba import OmniMambaConfig

    AutoImageProcessor.register(
        OmniMambaConfig,
        image_processor_classes={"pil": OmniMambaImageProcessor, "torchvision": OmniMambaImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(OmniMambaConfig, OmniMambaProcessor, exist_ok=True)


__all__ = [
    "MAX_IMAGE_PIXELS",
    "OmniMambaImageProcessor",
    "OmniMambaProcessor",
    "OmniMambaProcessorKwargs",
    "TOKEN_NAMES",
    "build_omnimamba_tokenizer",
    "check_tokenizer_matches_config",
    "load_image",
    "register_processing",
    "special_token_ids",
]
