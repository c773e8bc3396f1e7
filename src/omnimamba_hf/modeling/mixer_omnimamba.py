"""The Mamba-2 mixer of OmniMamba with task-specific LoRA on `in_proj` (ORIGINAL-SPEC §3.3, §3.4).

Two implementations of the same function:
* a pure-PyTorch path (chunked SSD scan for sequences, one-step recurrence for decoding) that runs anywhere and is
  the reference the tests check against a plain per-timestep recurrence;
* mamba-ssm's Triton kernels (chunked scan, state update) and causal-conv1d's CUDA kernels, used automatically for
  CUDA tensors when the packages import. Set `OMNIMAMBA_DISABLE_KERNELS=1` to force the PyTorch path.

The recurrent state lives in a transformers `DynamicCache` whose layers are linear-attention layers (conv state =
the last `conv_kernel` *pre-activation* xBC columns, recurrent state = the SSM state `[B, heads, head_dim, d_state]`
kept in float32, or in the model's dtype with `config.ssm_state_dtype="model"`; see `ssm_state_dtype`).
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("mmu", "t2i")


@functools.cache
def mamba_kernels() -> SimpleNamespace | None:
    """mamba-ssm / causal-conv1d kernels if importable (None otherwise, or when disabled by the environment)."""
    if os.environ.get("OMNIMAMBA_DISABLE_KERNELS", "0") not in ("", "0"):
        return None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        causal_conv1d_fn = causal_conv1d_update = None
    try:  # conv + scan + gated norm + out_proj in one autograd function that recomputes in backward
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except Exception:
        mamba_split_conv1d_scan_combined = None
    return SimpleNamespace(
        # validated on the GPU (tests/gpu: fp32 loss 8e-8, grads 6e-5 rel. error); OMNIMAMBA_FUSED_SCAN=0 turns it off
        split_conv1d_scan=mamba_split_conv1d_scan_combined
        if causal_conv1d_fn is not None and os.environ.get("OMNIMAMBA_FUSED_SCAN", "1") not in ("", "0")
        else None,
        chunk_scan=mamba_chunk_scan_combined,
        state_update=selective_state_update,
        conv1d_fn=causal_conv1d_fn,
        conv1d_update=causal_conv1d_update,
    )


# ---- task routing ---------------------------------------------------------------------------------------------------
# A forward pass runs either one task for the whole batch (a Python string: the fast path, one adapter) or one task per
# sample (a LongTensor of indices into TASKS: every adapter is evaluated and each row keeps its own).

TaskRoute = str | torch.Tensor


class OmniMambaTaskAdapter(nn.Module):
    """One low-rank adapter: `up(down(x))`, `down` [r, in], `up` [out, r] (the original's `*_lora_A0` / `*_lora_B0`)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class OmniMambaTaskLinear(nn.Linear):
    """`in_proj` = a bias-free Linear plus one LoRA adapter per task, `y = x Wᵀ + scaling · up(down(dropout(x)))`
    with the adapter of the sample's task (§3.3: r 8, alpha 32 → scaling 4, dropout 0.05 on the adapter branch only).
    Named `task_adapters` (not `lora_*`) so that PEFT's name-based detection never mistakes them for its own."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__(in_features, out_features, bias=False)
        self.task_adapters = nn.ModuleDict({t: OmniMambaTaskAdapter(in_features, out_features, rank) for t in TASKS})
        self.scaling = alpha / rank
        self.adapter_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, task: TaskRoute = "mmu") -> torch.Tensor:
        y = F.linear(x, self.weight)
        x = self.adapter_dropout(x)
        if isinstance(task, str):
            return y + self.scaling * self.task_adapters[task](x)
        for index, name in enumerate(TASKS):
            rows = (task == index).view(-1, *([1] * (x.dim() - 1)))
            y = y + torch.where(rows, self.scaling * self.task_adapters[name](x), 0.0)
        return y


# ---- pure-PyTorch SSD ---------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (the tests' reference precision)."""
    return torch.promote_types(x.dtype, torch.float32)


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above the diagonal (stable: cumsum of masked copies)."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0).cumsum(dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return x.masked_fill(~keep, -torch.inf)


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD ("state space duality") chunked scan in float32 (float64 inputs stay float64), without the D term.

    x [b, l, h, p], dt [b, l, h] (already softplus-ed), A [h] (negative), B/C [b, l, g, n], initial_state [b, h, p, n].
    Computes h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t, y_t = h_t·C_t; returns (y [b, l, h, p], final state).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    f = _compute_dtype(x)
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    B = B.to(f).repeat_interleave(h // g, dim=2)
    C = C.to(f).repeat_interleave(h // g, dim=2)
    pad = (-l) % chunk_size
    if pad:  # zero steps at the end: dt = 0 keeps the state unchanged (exp(0) = 1, no input)
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // chunk_size
    x = (x * dt[..., None]).view(b, c, chunk_size, h, p)
    B, C = B.view(b, c, chunk_size, h, n), C.view(b, c, chunk_size, h, n)
    a = (dt * A).view(b, c, chunk_size, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cumsum = a.cumsum(dim=-1)

    # 1. within each chunk: a masked "attention" C_i·B_j · exp(sum a_{j+1..i})
    decay = torch.exp(_segment_sum(a))  # [b, h, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x)
    # 2. the state each chunk contributes at its end
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)
    # 3. carry states across chunks
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[:, 0])
    chunk_states = torch.cat([initial_state.to(f)[:, None], chunk_states], dim=1)
    chunk_decay = torch.exp(_segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. each chunk's incoming state read out by C
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l]
    return y, final_state


def ssm_state_dtype(config, dtype: torch.dtype) -> torch.dtype:
    """dtype of the SSM recurrent state of a model computing in `dtype`, per `config.ssm_state_dtype` (an
    `OmniMambaConfig`): "float32" (float64 for float64 models) or "model" (`dtype` itself, as the original keeps it,
    ORIGINAL-SPEC §5.3). Either way each update is computed in float32 (float64 for float64) and rounded once when
    stored; the step's output reads the unrounded update, as mamba-ssm's `selective_state_update` does."""
    choice = getattr(config, "ssm_state_dtype", "float32")
    if choice == "model":
        return dtype
    if choice == "float32":
        return torch.promote_types(dtype, torch.float32)
    raise ValueError(f"config.ssm_state_dtype must be 'float32' or 'model', got {choice!r}.")


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step. state [b, h, p, n] (float32), x [b, h, p], dt [b, h], B/C [b, g, n]. Returns (y, state)."""
    h = x.shape[1]
    g = B.shape[1]
    f = _compute_dtype(x)
    B = B.to(f).repeat_interleave(h // g, dim=1)
    C = C.to(f).repeat_interleave(h // g, dim=1)
    dt = dt.to(f)
    state = state.to(f) * torch.exp(dt * A.to(f))[..., None, None] + (dt[..., None] * x.to(f))[..., None] * B[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


# ---- norms ----------------------------------------------------------------------------------------------------------


class OmniMambaRMSNorm(nn.Module):
    """RMSNorm computed in float32 (mamba-ssm's fused add+norm semantics, §3.2): `x·rsqrt(mean(x²)+eps)·w`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        f = _compute_dtype(x)
        x32 = x.to(f)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x32 * self.weight.to(f)).to(out_dtype or x.dtype)


class OmniMambaGatedRMSNorm(nn.Module):
    """Gated RMSNorm with norm_before_gate=False (§3.4 step 6): g = y·SiLU(z), normalised per group of channels."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        f = _compute_dtype(y)
        g = y.to(f) * F.silu(z.to(f))
        g = g.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (g.flatten(-2) * self.weight.to(f)).to(y.dtype)


# ---- the mixer ------------------------------------------------------------------------------------------------------


class OmniMambaMixer(nn.Module):
    """Mamba-2 mixer (mamba-ssm 2.2.2 semantics, §3.4) whose `in_proj` carries the task adapters."""

    def __init__(self, config, layer_idx: int, rank: int, alpha: float, dropout: float, state_config=None):
        super().__init__()
        self.layer_idx = layer_idx
        # the OmniMambaConfig whose `ssm_state_dtype` is read when a cache gets its first state (None: float32)
        self.state_config = state_config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.intermediate_size = config.num_heads * config.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.time_step_limit = tuple(config.time_step_limit)
        self._xbc_sizes = [self.intermediate_size, self.n_groups * self.ssm_state_size, self.n_groups * self.ssm_state_size]
        # in_proj output order: z ‖ xBC ‖ dt (§1.3)
        projection_size = self.intermediate_size + self.conv_dim + self.num_heads
        self.in_proj = OmniMambaTaskLinear(config.hidden_size, projection_size, rank, alpha, dropout)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = OmniMambaGatedRMSNorm(
            self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        # mamba-ssm excludes these from weight decay (its `_no_weight_decay` tag)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        f = _compute_dtype(dt)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))
        if self.time_step_limit != (0.0, math.inf):
            dt = dt.clamp(*self.time_step_limit)
        return dt

    def forward(
        self,
        hidden_states: torch.Tensor,
        task: TaskRoute = "mmu",
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        mask = attention_mask[:, :, None].to(dtype) if attention_mask is not None and seq_len > 1 else None
        if mask is not None:  # padding contributes nothing to conv or state (in_proj has no bias)
            hidden_states = hidden_states * mask
        zxbcdt = self.in_proj(hidden_states, task)
        z, xBC, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.to(_compute_dtype(self.A_log)))
        kernels = mamba_kernels() if hidden_states.is_cuda else None
        weight = self.conv1d.weight.squeeze(1)  # [conv_dim, K]

        fusable = type(self.out_proj) is nn.Linear and type(self.conv1d) is nn.Conv1d  # not wrapped (e.g. by PEFT)
        if cache is None and mask is None and fusable and kernels is not None and kernels.split_conv1d_scan:
            # No state to keep and nothing padded: the original's training path (§3.4), memory-light in backward.
            # The kernel reads conv1d / norm / out_proj weights directly, so it is only used when they are plain modules.
            return kernels.split_conv1d_scan(
                zxbcdt, weight, self.conv1d.bias, self.dt_bias, A, D=self.D, chunk_size=self.chunk_size,
                dt_limit=self.time_step_limit, activation="silu", rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.variance_epsilon, outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias, headdim=self.head_dim, ngroups=self.n_groups, norm_before_gate=False,
            )  # fmt: skip
        stepping = cache is not None and seq_len == 1 and cache.get_conv_state(self.layer_idx) is not None
        if stepping:
            y = self._step(xBC[:, 0], dt[:, 0], A, weight, cache, kernels)[:, None]
        else:
            y = self._scan(xBC, dt, A, weight, cache, kernels, mask)
        y = self.norm(y, z)
        return self.out_proj(y)

    def _scan(self, xBC, dt, A, weight, cache, kernels, mask):
        """A whole sequence (training, or the prefill of generation), continuing any cached state."""
        batch, seq_len, _ = xBC.shape
        K = self.conv_kernel_size
        previous = None
        if cache is not None:
            previous = cache.get_conv_state(self.layer_idx)
            previous = previous.clone() if previous is not None else None  # the update below writes in place
            cache.update_conv_state(xBC.transpose(1, 2), self.layer_idx, conv_kernel_size=K)
        if previous is not None:  # continue a cached sequence: the conv sees the cached columns first
            full = torch.cat([previous[..., 1:].to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
            xBC = F.silu(F.conv1d(full, weight[:, None], self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        elif kernels is not None and kernels.conv1d_fn is not None:
            xt = xBC.transpose(1, 2)  # channel-last view of the in_proj output; the kernel needs strides % 8 == 0
            if xt.stride(0) % 8 or xt.stride(2) % 8:
                xt = xt.contiguous()
            xBC = kernels.conv1d_fn(xt, weight, self.conv1d.bias, activation="silu").transpose(1, 2)
        else:
            xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :seq_len]).transpose(1, 2)
        if mask is not None:
            xBC = xBC * mask
        x, B, C = xBC.split(self._xbc_sizes, dim=-1)
        x = x.view(batch, seq_len, self.num_heads, self.head_dim)
        B = B.view(batch, seq_len, self.n_groups, self.ssm_state_size)
        C = C.view(batch, seq_len, self.n_groups, self.ssm_state_size)
        initial = cache.get_recurrent_state(self.layer_idx) if cache is not None else None

        if kernels is not None:
            y, final = kernels.chunk_scan(
                x, dt, A, B, C, self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias,
                initial_states=initial, dt_softplus=True, dt_limit=self.time_step_limit, return_final_states=True,
            )  # fmt: skip
        else:
            y, final = ssd_chunked_scan(x, self._dt(dt), A, B, C, self.chunk_size, initial)
            y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
        if cache is not None:  # a cache's first state fixes its dtype; later updates are cast into it
            state_dtype = initial.dtype if initial is not None else ssm_state_dtype(self.state_config, xBC.dtype)
            cache.update_recurrent_state(final.to(state_dtype), self.layer_idx)
        return y.reshape(batch, seq_len, -1).to(xBC.dtype)

    def _step(self, xBC, dt, A, weight, cache, kernels):
        """One decoding step from the cached conv + SSM state (the original's `Mamba2.step`)."""
        batch, dtype = xBC.shape[0], xBC.dtype
        conv_state = cache.get_conv_state(self.layer_idx)
        if kernels is not None and kernels.conv1d_update is not None:
            xBC = kernels.conv1d_update(xBC, conv_state, weight, self.conv1d.bias, "silu")
        else:
            window = cache.update_conv_state(xBC[:, :, None], self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            window = window[..., -self.conv_kernel_size :]
            f = _compute_dtype(window)
            xBC = (window.to(f) * weight.to(f)).sum(-1)
            if self.conv1d.bias is not None:
                xBC = xBC + self.conv1d.bias.to(f)
            xBC = F.silu(xBC).to(dtype)
        x, B, C = xBC.split(self._xbc_sizes, dim=-1)
        x = x.view(batch, self.num_heads, self.head_dim)
        B = B.view(batch, self.n_groups, self.ssm_state_size)
        C = C.view(batch, self.n_groups, self.ssm_state_size)
        state = cache.get_recurrent_state(self.layer_idx)
        if kernels is not None:
            p, n = self.head_dim, self.ssm_state_size
            y = kernels.state_update(
                state, x, dt[:, :, None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
                D=self.D[:, None].expand(-1, p), z=None, dt_bias=self.dt_bias[:, None].expand(-1, p), dt_softplus=True,
            )  # fmt: skip  (updates `state` in place)
        else:
            y, new_state = ssd_step(state, x, self._dt(dt), A, B, C)
            y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
            cache.update_recurrent_state(new_state, self.layer_idx)
        return y.reshape(batch, -1).to(dtype)


__all__ = [
    "TASKS",
    "OmniMambaTaskAdapter",
    "OmniMambaTaskLinear",
    "OmniMambaRMSNorm",
    "OmniMambaGatedRMSNorm",
    "OmniMambaMixer",
    "ssd_chunked_scan",
    "ssd_step",
    "ssm_state_dtype",
    "mamba_kernels",
]
