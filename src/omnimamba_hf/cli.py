"""`omnimamba-hf` command line: one entry point, one subcommand per job.

    omnimamba-hf demo                      train (once, cached) and evaluate the embedded tiny model on sklearn digits
    omnimamba-hf describe IMAGE -q "…"     answer a question about an image (MMU)
    omnimamba-hf generate-image "PROMPT"   generate a 256×256 image (T2I), saved as PNG
    omnimamba-hf convert …                 original release → Hub layout (see docs/CONVERSION.md)
    omnimamba-hf export-original DIR OUT   Hub layout → one original-layout .pth (see docs/CONVERSION.md)
    omnimamba-hf train --stage …           the two-stage recipe on Trainer (see docs/TRAINING.md)
"""

import sys

COMMANDS = {
    "demo": ("omnimamba_hf.demo.cli", "demo_main"),
    "describe": ("omnimamba_hf.demo.cli", "describe_main"),
    "generate-image": ("omnimamba_hf.demo.cli", "generate_image_main"),
    "convert": ("omnimamba_hf.conversion.convert_omnimamba_weights_to_hf", "main"),
    "export-original": ("omnimamba_hf.conversion.export_to_original", "main"),
    "train": ("omnimamba_hf.training.cli", "train_command"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"omnimamba-hf: unknown command {name!r}; choose from {', '.join(COMMANDS)}.\n{__doc__}", file=sys.stderr)
        return 2
    import importlib

    module, function = COMMANDS[name]
    result = getattr(importlib.import_module(module), function)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
