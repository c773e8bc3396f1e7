"""CPU stand-in for timm (dry runs of the parity harness only; see ../README.md): the two ViT variants OmniMamba
creates, with timm's parameter names and forward, `get_intermediate_layers` (timm >= 1.0: returns a list), and the
eval transform."""
from . import data, models  # noqa: F401
from .models import create_model  # noqa: F401

__version__ = "0.0-cpu-stub"
