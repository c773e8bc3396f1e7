from .vision_transformer import create_model  # noqa: F401
