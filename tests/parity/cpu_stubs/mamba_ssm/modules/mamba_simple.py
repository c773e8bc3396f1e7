import torch.nn as nn


class Mamba(nn.Module):  # Mamba-1: never built by OmniMamba
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("cpu stub")
