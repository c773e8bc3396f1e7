"""CPU stand-in for einops (imported, unused, by the original's generation.py; dry runs only)."""


def rearrange(*args, **kwargs):
    raise NotImplementedError("cpu stub")


def repeat(*args, **kwargs):
    raise NotImplementedError("cpu stub")
