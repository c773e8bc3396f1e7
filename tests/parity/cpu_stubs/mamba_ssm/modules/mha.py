import torch.nn as nn


class MHA(nn.Module):  # never built by OmniMamba (attn_layer_idx is empty)
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("cpu stub")
