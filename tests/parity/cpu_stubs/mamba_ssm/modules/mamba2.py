"""Mamba2 of mamba_ssm 2.2.2 / 2.3.2 (same constructor, parameter names and math), with a per-timestep recurrence
instead of the chunked Triton scan. CPU dry runs only."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _GatedRMSNorm(nn.Module):  # mamba_ssm.ops.triton.layernorm_gated.RMSNorm, norm_before_gate=False, one group
    def __init__(self, d, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, y, z):
        dtype = y.dtype
        g = y.float() * F.silu(z.float())
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(dtype)


class Mamba2(nn.Module):
    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False, conv_bias=True,
                 chunk_size=256, use_mem_eff_path=True, layer_idx=None, process_group=None, sequence_parallel=True,
                 device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        assert ngroups == 1 and not D_has_hdim and rmsnorm and not norm_before_gate and d_ssm is None
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.headdim, self.d_ssm, self.ngroups = headdim, self.d_inner, ngroups
        self.nheads = self.d_ssm // headdim
        self.layer_idx, self.chunk_size = layer_idx, chunk_size
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **fk)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, bias=conv_bias, kernel_size=d_conv, groups=conv_dim,
                                padding=d_conv - 1, **fk)
        self.act = nn.SiLU()
        dt = torch.exp(torch.rand(self.nheads, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.norm = _GatedRMSNorm(self.d_ssm, eps=1e-5, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_ssm, self.d_ssm + 2 * self.d_state, self.nheads], dim=-1)

    def _ssm_step(self, h, x, B, C, dt):  # x (b,H,P), B/C (b,N), dt (b,H) after softplus; h (b,H,P,N) fp32
        A = -torch.exp(self.A_log.float())
        dA = torch.exp(dt * A)
        h = h * dA[..., None, None] + (dt[..., None] * x.float())[..., None] * B.float()[:, None, None, :]
        y = (h * C.float()[:, None, None, :]).sum(-1) + self.D.float()[:, None] * x.float()
        return h, y

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        b, L, _ = u.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, b)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out
        z, xBC, dt = self._split(self.in_proj(u))
        if conv_state is not None:
            xt = xBC.transpose(1, 2)
            conv_state.copy_(F.pad(xt, (self.d_conv - xt.shape[-1], 0)))
        xBC = self.act(self.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_ssm, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        h = torch.zeros(b, self.nheads, self.headdim, self.d_state, device=u.device, dtype=torch.float32)
        ys = []
        for t in range(L):
            h, y = self._ssm_step(h, x[:, t].reshape(b, self.nheads, self.headdim), B[:, t], C[:, t], dt[:, t])
            ys.append(y.reshape(b, -1))
        if ssm_state is not None:
            ssm_state.copy_(h)
        y = torch.stack(ys, 1).to(u.dtype)
        return self.out_proj(self.norm(y, z))

    def step(self, hidden_states, conv_state, ssm_state):
        dtype = hidden_states.dtype
        z, xBC, dt = self._split(self.in_proj(hidden_states.squeeze(1)))
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        xBC = torch.sum(conv_state * self.conv1d.weight[:, 0], dim=-1) + self.conv1d.bias
        xBC = self.act(xBC).to(dtype)
        x, B, C = torch.split(xBC, [self.d_ssm, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        h, y = self._ssm_step(ssm_state.float(), x.reshape(-1, self.nheads, self.headdim), B, C, dt)
        ssm_state.copy_(h)
        out = self.out_proj(self.norm(y.reshape(y.shape[0], -1).to(dtype), z))
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0], device=device,
                                 dtype=conv_dtype).transpose(1, 2)
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx not in inference_params.key_value_memory_dict:
            inference_params.key_value_memory_dict[self.layer_idx] = self.allocate_inference_cache(batch_size, 0)
        return inference_params.key_value_memory_dict[self.layer_idx]
