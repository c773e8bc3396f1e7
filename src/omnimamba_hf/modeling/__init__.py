from .configuration_omnimamba import OmniMambaConfig, OmniMambaVisionConfig, OmniMambaVQVAEConfig
from .modeling_omnimamba import (
    OmniMambaCausalLMOutput,
    OmniMambaForConditionalGeneration,
    OmniMambaModel,
    OmniMambaModelOutput,
    OmniMambaPreTrainedModel,
)

__all__ = [
    "OmniMambaConfig",
    "OmniMambaVisionConfig",
    "OmniMambaVQVAEConfig",
    "OmniMambaPreTrainedModel",
    "OmniMambaModel",
    "OmniMambaForConditionalGeneration",
    "OmniMambaModelOutput",
    "OmniMambaCausalLMOutput",
]
