"""Fused add + (RMS)norm of mamba_ssm, as plain PyTorch (fp32 math, like the Triton kernel)."""
import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                  return_dropout_mask=False, out_dtype=None, **kwargs):
    dtype = x.dtype
    r = x.float() if residual is None else x.float() + residual.float()
    if is_rms_norm:
        y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    else:
        y = torch.nn.functional.layer_norm(r, r.shape[-1:], weight.float(), None, eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype or dtype)
    if residual is not None:
        residual_out = r.to(residual.dtype)
    else:
        residual_out = r if residual_in_fp32 else r.to(dtype)
    return (y, residual_out) if prenorm else y


def rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6, **kwargs):
    return layer_norm_fn(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=True)
