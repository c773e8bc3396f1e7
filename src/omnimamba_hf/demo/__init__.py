"""The embedded demo: a tiny OmniMamba trained offline on scikit-learn's handwritten digits (`omnimamba-hf demo`).

See docs/DEMO.md. Modules: `data` (digits → images, texts, split), `tiny` (config, tokenizer, processor),
`vq_pretrain` (the tiny VQ), `train` (the two-stage recipe with `OmniMambaTrainer`), `evaluate` (MMU accuracy, T2I
class consistency), `cli` (the `demo`, `describe` and `generate-image` commands).
"""

from .cli import default_demo_dir, demo_main, demo_model_dir, describe_main, generate_image_main

__all__ = ["default_demo_dir", "demo_main", "demo_model_dir", "describe_main", "generate_image_main"]
