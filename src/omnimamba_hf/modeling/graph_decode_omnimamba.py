"""CUDA-graph decoding over a static recurrent state: the GPU fast path of `generate()` for both tasks.

A recurrent model decodes with a constant-size state, so one decode step has fully static shapes: the token ids and
positions of the batch, the conv state `[layers, B, conv_dim, K]` and the SSM state `[layers, B, heads, head_dim,
d_state]` (float32, or the model's dtype with `config.ssm_state_dtype="model"`). The step is written as one function
over preallocated buffers (backends: this package's fused Triton kernels, mamba-ssm's kernels + cuBLAS, the two
mixed for large batches, or the PyTorch step compiled by torch.compile) and captured once in a CUDA graph, so a
decode step costs one graph replay: launch overhead disappears and the step approaches the time to read the weights
once (the memory floor). The task LoRA stays exact: `x Wᵀ + s · up(down(x))` with the task's adapter,
not merged into the base weight.

The prefill (graph_prefill_omnimamba.py on "cuda_graph", else the eager forward) leaves its final states in a
`DynamicCache`; `load_state` copies them into the static buffers. Decoders are cached on the model per (task, batch
size, dtype, state dtype, device).
"""
import dataclasses
import functools
import gc
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .triton_decode_omnimamba import (
    LAUNCH, TENSOR_CORE_DTYPES, SplitKWorkspace, conv_ssm_step, embed_rows, fused_decode_available, gated_norm_gemv,
    gated_sumsq_parts, launch_configs, rmsnorm_gemv, tensor_cores_available,
)
from .mixer_omnimamba import TASKS, mamba_kernels, ssm_state_dtype
from .triton_choice_omnimamba import choose_and_feed

# Largest batch for which "auto" picks the fused Triton step: its CUDA-core GEMVs up to batch 3 (they read each weight
# tile once for all rows, but multiply on CUDA cores), then, in bfloat16, its tensor-core GEMMs
# (triton_decode_omnimamba.launch_configs). H100, bf16, ms per T2I step, fused vs mamba-ssm kernels + cuBLAS: b1 1.27 vs
# 2.15, b4 1.81 vs 2.45, b8 2.25 vs 2.75, b16 3.08 vs 3.39, b32 4.91 vs 4.71, b64 8.77 vs 7.25; CUDA-core GEMVs at b4:
# 2.60 (docs/benchmarks/2026-11-24-h100-session5/tensor_core_steps.log). Beyond 16 rows: the kernels backend, or, with
# the SSM state in bf16 (config.ssm_state_dtype="model"), the hybrid one (mamba-ssm's state update streams a bf16
# state slowly). T2I, bf16 state, fused / kernels / hybrid: b16 2.60 / 3.21 / 3.01, b32 4.01 / 4.27 / 3.89, b64
# 6.88 / 6.25 / 5.65; float32 state: b32 4.92 / 4.71 / 4.83, b64 8.79 / 7.26 / 7.78
# (docs/benchmarks/2026-11-24-h100-session6/steps_hybrid_state_*.log).
FUSED_MAX_BATCH = 3
FUSED_MAX_BATCH_TENSOR_CORES = 16
# Steps per captured graph in `OmniMambaGraphDecoder.decode` (decoding with the choice of each token inside the graph).
DECODE_CHUNK = 8
LARGE_BATCH_BACKEND = {torch.bfloat16: "hybrid"}  # by SSM state dtype; "kernels" for the others


@torch.no_grad()
def fused_in_proj(model) -> list[torch.Tensor]:
    """Per layer one buffer [W_in; down_mmu; down_t2i], so that `in_proj` and the adapters' `down` run as ONE GEMV
    (a separate tiny GEMV costs ~5 µs per layer, ~10% of a batch-1 step on an H100). `in_proj.weight` becomes a view
    of the buffer's first rows, so the base weight is not duplicated; the `down` rows are copies, refreshed on every
    call (adapters may have been trained since). Exact: the same products, launched together.
    Cached on the model; rebuilt when an `in_proj.weight` tensor has been replaced (e.g. by
    `load_state_dict(assign=True)`)."""
    layers = model.model.language_model.layers
    cached = model.__dict__.get("_omnimamba_fused_in_proj")
    if cached is None or any(l.mixer.in_proj.weight.data_ptr() != b.data_ptr() for l, b in zip(layers, cached)):
        cached = []
        for layer in layers:
            linear = layer.mixer.in_proj
            rows = linear.weight.shape[0] + sum(a.down.weight.shape[0] for a in linear.task_adapters.values())
            buffer = torch.empty(rows, linear.weight.shape[1], dtype=linear.weight.dtype, device=linear.weight.device)
            buffer[: linear.weight.shape[0]].copy_(linear.weight)
            linear.weight.data = buffer[: linear.weight.shape[0]]
            cached.append(buffer)
        model.__dict__["_omnimamba_fused_in_proj"] = cached
    # the adapters' rows are copies, refreshed on every call with one multi-tensor copy: a weight changed through
    # `.data` leaves no trace (no `_version` bump) to test for
    rows, weights = [], []
    for layer, buffer in zip(layers, cached):
        linear = layer.mixer.in_proj
        start = linear.weight.shape[0]
        for t in TASKS:
            down = linear.task_adapters[t].down.weight
            rows.append(buffer[start : start + down.shape[0]])
            weights.append(down)
            start += down.shape[0]
    torch._foreach_copy_(rows, weights)
    return cached


@torch.no_grad()
def ssm_decay_rates(model) -> list[torch.Tensor]:
    """Per layer `A = -exp(A_log)` in float32, in buffers that never move (captured graphs read them), recomputed in
    place on every call with three multi-tensor ops. Cached on the model, shared by decoders and prefills; new buffers
    only when the model moved to another device."""
    logs = [layer.mixer.A_log for layer in model.model.language_model.layers]
    rates = model.__dict__.get("_omnimamba_ssm_decay_rates")
    if rates is None or rates[0].device != logs[0].device:
        rates = [torch.empty(p.shape, device=p.device, dtype=torch.float32) for p in logs]
        model.__dict__["_omnimamba_ssm_decay_rates"] = rates
    torch._foreach_copy_(rates, logs)  # the float32 cast
    torch._foreach_exp_(rates)
    torch._foreach_neg_(rates)
    return rates


# dtypes in which a T2I decoder on CUDA embeds image codes through a per-call table (`image_code_table`): the table's
# GEMM (2 · 16384 · 37.7M = 1.24 TFLOP at 1.3B) runs on tensor cores in ~2 ms, less than the 256 per-step MLPs it
# replaces cost at batch 1 (~50 µs each on an H100); in float32 it would cost about what it saves.
IMAGE_CODE_TABLE_DTYPES = (torch.bfloat16, torch.float16)


def uses_image_code_table(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a T2I decoder on `device` in `dtype` embeds codes from `image_code_table` by default."""
    return device.type == "cuda" and dtype in IMAGE_CODE_TABLE_DTYPES


@torch.no_grad()
def image_code_table(model, chunk: int = 1024) -> torch.Tensor:
    """`image_embeddings(k)` (VQ-code lookup + 3-layer MLP, spec §3.5) for every code k, so that a T2I decode step
    reads one row instead of running the MLP (~75 MB of weights per step at 1.3B). One buffer per model that never
    moves (captured graphs read it), recomputed in place on every call in chunks of `chunk` codes: weights changed
    through `.data` leave no trace to test for, as with `fused_in_proj`. New buffer only when the device or dtype
    changed."""
    embedding = model.model.image_embeddings
    codes = embedding.embeddings.weight
    table = model.__dict__.get("_omnimamba_image_code_table")
    if table is None or table.device != codes.device or table.dtype != codes.dtype:
        table = torch.empty(codes.shape[0], embedding.mlp.linear_3.out_features, device=codes.device, dtype=codes.dtype)
        model.__dict__["_omnimamba_image_code_table"] = table
    for start in range(0, codes.shape[0], chunk):
        table[start : start + chunk] = embedding.mlp(codes[start : start + chunk])
    return table


@functools.cache
def mamba_kernels_for_decode() -> SimpleNamespace | None:
    """mamba-ssm's fused norms + the mixer kernels, if all import (None otherwise)."""
    k = mamba_kernels()
    if k is None or k.conv1d_update is None:
        return None
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception:
        return None
    return SimpleNamespace(**vars(k), layer_norm_fn=layer_norm_fn, rmsnorm_fn=rmsnorm_fn)


class OmniMambaGraphDecoder:
    """Decode steps of one task for a fixed batch size as a replayable CUDA graph (or eagerly, for tests on CPU)."""

    def __init__(
        self, model, task: str, batch_size: int, compile: bool = True, use_graph: bool = True, backend: str = "auto",
        code_table: bool | None = None,
    ):
        self.model = model
        self.task = task
        config = model.config
        text = config.text_config
        lm = model.model.language_model
        device = lm.embeddings.weight.device
        self.dtype = lm.embeddings.weight.dtype
        mixer = lm.layers[0].mixer
        n = text.num_hidden_layers
        self.conv = torch.zeros(n, batch_size, mixer.conv_dim, mixer.conv_kernel_size, device=device, dtype=self.dtype)
        self.state_dtype = ssm_state_dtype(config, self.dtype)
        self.ssm = torch.zeros(
            n, batch_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=device, dtype=self.state_dtype
        )
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        width = config.text_vocab_size if task == "mmu" else config.image_vocab_size
        self.logits = torch.zeros(batch_size, width, device=device, dtype=self.dtype)
        self.batch_size = batch_size
        # decode(): the chosen tokens (at most one per row of the task's position table), the next column of
        # `_tokens`, the rows that have not chosen an eos token yet
        table = model.model.mmu_position_embeddings if task == "mmu" else model.model.t2i_position_embeddings
        self._tokens = torch.zeros(batch_size, table.shape[1], dtype=torch.long, device=device)
        self._k = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self._eos = {}  # eos ids as tensors the decode() graphs read (padded with -1 to a power of two), by tuple of ids
        self._seed = torch.zeros(1, dtype=torch.long, device=device)  # FusedChoice sampling: drawn per decode() call
        # T2I: embed image codes from `image_code_table` (refreshed by `load_state`) instead of the per-step MLP;
        # by default on CUDA in half precision (IMAGE_CODE_TABLE_DTYPES)
        if code_table is None:
            code_table = uses_image_code_table(device, self.dtype)
        self._code_table = image_code_table(model) if task == "t2i" and code_table else None
        self._constants = (
            text.layer_norm_epsilon, mixer.in_proj.scaling, mixer.intermediate_size, mixer.conv_dim, mixer.num_heads,
            mixer.head_dim, mixer.ssm_state_size, mixer.n_groups, mixer.norm.group_size, tuple(mixer.time_step_limit),
            self.dtype,
        )  # fmt: skip
        # backend "fused": this package's Triton kernels, 3 launches per layer (triton_decode_omnimamba.py);
        # "kernels": mamba-ssm's fused Triton kernels (add+RMSNorm, conv update, state update, gated norm) + cuBLAS,
        # ~7 launches per layer; "hybrid": the "kernels" backend with this package's conv + SSM kernel in place of
        # causal-conv1d's conv update and mamba-ssm's state update (which streams the state at ~56% of copy bandwidth
        # at 64 rows); "inductor": the PyTorch step compiled once per layer shape by torch.compile.
        kernels = mamba_kernels_for_decode() if device.type == "cuda" else None
        fused_ok = fused_decode_available(device.type) and _fused_supports(mixer)
        if backend == "auto":
            tensor_cores = self.dtype in TENSOR_CORE_DTYPES and tensor_cores_available(device)
            limit = FUSED_MAX_BATCH_TENSOR_CORES if tensor_cores else FUSED_MAX_BATCH
            if fused_ok and use_graph and batch_size <= limit:
                backend = "fused"
            elif kernels is not None and use_graph:
                backend = LARGE_BATCH_BACKEND.get(self.state_dtype, "kernels") if fused_ok else "kernels"
            else:
                backend = "inductor"
        if backend in ("kernels", "hybrid") and kernels is None:
            raise ValueError(f"backend={backend!r} needs mamba-ssm and causal-conv1d on a CUDA device.")
        if backend in ("fused", "hybrid") and not fused_ok:
            raise ValueError(
                f"backend={backend!r} needs Triton on a CUDA device (or TRITON_INTERPRET=1 on CPU) and a mixer with "
                "power-of-two head_dim / state size / adapter rank / conv width and one gated-norm group."
            )
        self.backend = backend
        self._kernels = kernels
        self._fused_in_proj = None
        if backend in ("kernels", "fused", "hybrid"):
            self._A = ssm_decay_rates(model)
            self._fused_in_proj = fused_in_proj(model)
        if backend in ("fused", "hybrid"):  # the buffers of the conv + SSM kernel
            self._proj = torch.zeros(batch_size, self._fused_in_proj[0].shape[0], device=device, dtype=self.dtype)
            self._gated = torch.zeros(batch_size, mixer.intermediate_size, device=device, dtype=torch.float32)
            self._bc_new = torch.zeros(
                batch_size, 2 * mixer.n_groups * mixer.ssm_state_size, device=device, dtype=self.dtype
            )
            parts = gated_sumsq_parts(mixer.num_heads, mixer.head_dim, LAUNCH["ssm_block_p"])
            self._gated_sumsq = torch.zeros(batch_size, parts, device=device, dtype=torch.float32)
        if backend == "fused":  # the fused GEMVs' float32 residual stream and split-K scratch
            self._residual = torch.zeros(batch_size, text.hidden_size, device=device, dtype=torch.float32)
            self._split_k = SplitKWorkspace(device)  # scratch of the split-K tensor-core GEMVs (batch >= 4, bf16)
        # One layer is compiled once and reused by all layers (same shapes): a few seconds of compilation, not minutes.
        compiled = compile and backend == "inductor"
        self._layer = torch.compile(_layer_step, fullgraph=True, dynamic=False) if compiled else _layer_step
        self._fn = {"kernels": self._step_kernels, "fused": self._step_fused, "hybrid": self._step_hybrid}.get(
            backend, self._step
        )
        self._graphs = {}  # captured graphs: "step", and decode() chunks by (steps, choice, rows, eos ids, pad, offset)
        self._use_graph = use_graph and device.type == "cuda"

    # -- state in / out -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_state(self, cache) -> None:
        """Copy the final states of an eager prefill (a transformers `DynamicCache`) into the static buffers."""
        if self._fused_in_proj is not None:
            fused = fused_in_proj(model=self.model)
            if fused is not self._fused_in_proj:  # in_proj weights were replaced: new buffers, new graph
                self._fused_in_proj = fused
                self.release()  # the graphs read the old buffers
            rates = ssm_decay_rates(self.model)  # refreshed in place: the graph reads these buffers
            if rates is not self._A:
                self._A = rates
                self.release()  # the graphs read the old buffers
        if self._code_table is not None:
            table = image_code_table(self.model)
            if table is not self._code_table:
                self._code_table = table
                self.release()  # the graphs read the old buffers
        layers = cache.layers  # two multi-tensor copies, not 2 × 48 launches
        torch._foreach_copy_(list(self.conv.unbind()), [layer.conv_states[0] for layer in layers])
        torch._foreach_copy_(list(self.ssm.unbind()), [layer.recurrent_states[0] for layer in layers])

    # -- the step -------------------------------------------------------------------------------------------------------

    def _step(self):
        """One token per row at `self.positions`; writes `self.logits`, updates the states in place."""
        lm = self.model.model.language_model
        residual = self._embed().float()
        for i, layer in enumerate(lm.layers):
            mixer = layer.mixer
            adapter = mixer.in_proj.task_adapters[self.task]
            residual = self._layer(
                residual, layer.norm.weight, mixer.in_proj.weight, adapter.down.weight, adapter.up.weight,
                mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight,
                mixer.out_proj.weight, self.conv[i], self.ssm[i], self._constants,
            )  # fmt: skip
        hidden = _rms_norm(residual, lm.norm_f.weight, lm.norm_f.variance_epsilon).to(self.dtype)
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        self.logits.copy_(head(hidden))

    def _embed(self):
        table, offset, positions = self._embedding_tables()
        rows = self.model.model.image_embeddings(self.ids - offset) if table is None else table[self.ids - offset]
        return rows.to(self.dtype) + positions[self.positions].to(self.dtype)

    def _embedding_tables(self):
        """(the rows ids are looked up in — None where T2I runs the image MLP per step —, the id of row 0, the task's
        position table)."""
        m = self.model.model
        if self.task == "mmu":
            return m.language_model.embeddings.weight, 0, m.mmu_position_embeddings[0]
        return self._code_table, self.model.config.text_vocab_size, m.t2i_position_embeddings[0]

    def _add_norm(self, layer, hidden, residual):
        """mamba-ssm's fused residual add + prenorm RMSNorm: (normed input of `layer`'s mixer, new residual)."""
        return self._kernels.layer_norm_fn(
            hidden, layer.norm.weight, None, residual=residual, prenorm=True, residual_in_fp32=True,
            eps=layer.norm.variance_epsilon, is_rms_norm=True,
        )  # fmt: skip

    def _final_norm_and_head(self, hidden, residual):
        lm = self.model.model.language_model
        hidden = self._kernels.layer_norm_fn(
            hidden, lm.norm_f.weight, None, residual=residual, prenorm=False, residual_in_fp32=True,
            eps=lm.norm_f.variance_epsilon, is_rms_norm=True,
        )  # fmt: skip
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        self.logits.copy_(head(hidden))

    def _conv_ssm(self, i, mixer, adapter_offset):
        """This package's conv + SSM kernel on layer `i`: `self._proj` → `self._gated` (+ B/C inputs, sums of
        squares; `_gated_sumsq` was sized for LAUNCH["ssm_block_p"])."""
        conv_ssm_step(
            self._proj, mixer.in_proj.task_adapters[self.task].up.weight, mixer.in_proj.scaling, adapter_offset,
            self.conv[i], mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, self._A[i], mixer.D,
            self.ssm[i], self._gated, self._bc_new, self._gated_sumsq, d_inner=mixer.intermediate_size,
            heads=mixer.num_heads, groups=mixer.n_groups, head_dim=mixer.head_dim, d_state=mixer.ssm_state_size,
            time_step_limit=tuple(mixer.time_step_limit), block_p=LAUNCH["ssm_block_p"],
        )  # fmt: skip

    def _adapter_offset(self) -> int:
        """Column of this task's `down` outputs in a row of the fused in_proj GEMV's output."""
        in_proj = self.model.model.language_model.layers[0].mixer.in_proj
        return in_proj.weight.shape[0] + in_proj.task_adapters[self.task].down.weight.shape[0] * TASKS.index(self.task)

    def _step_kernels(self):
        """The same step on mamba-ssm / causal-conv1d kernels (the original's `Mamba2.step` + fused add-norm)."""
        k = self._kernels
        lm = self.model.model.language_model
        hidden, residual = self._embed(), None
        for i, layer in enumerate(lm.layers):
            mixer = layer.mixer
            x, residual = self._add_norm(layer, hidden, residual)
            adapter = mixer.in_proj.task_adapters[self.task]
            both = F.linear(x, self._fused_in_proj[i])  # [z ‖ xBC ‖ dt ‖ down_mmu(x) ‖ down_t2i(x)]
            width, rank = mixer.in_proj.weight.shape[0], adapter.down.weight.shape[0]
            start = width + rank * TASKS.index(self.task)
            zxbcdt = torch.addmm(
                both[:, :width], both[:, start : start + rank], adapter.up.weight.t(), alpha=mixer.in_proj.scaling
            )
            z, xBC, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
            xBC = k.conv1d_update(xBC, self.conv[i], mixer.conv1d.weight[:, 0], mixer.conv1d.bias, "silu")
            xs, B, C = xBC.split(mixer._xbc_sizes, dim=-1)
            heads, p, n, g = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
            y = k.state_update(
                self.ssm[i], xs.reshape(-1, heads, p), dt[:, :, None].expand(-1, heads, p),
                self._A[i][:, None, None].expand(heads, p, n), B.reshape(-1, g, n), C.reshape(-1, g, n),
                D=mixer.D[:, None].expand(heads, p), z=None, dt_bias=mixer.dt_bias[:, None].expand(heads, p),
                dt_softplus=True,
            )  # fmt: skip
            y = k.rmsnorm_fn(
                y.reshape(y.shape[0], -1), mixer.norm.weight, None, z=z, eps=mixer.norm.variance_epsilon,
                group_size=mixer.norm.group_size, norm_before_gate=False,
            )  # fmt: skip
            hidden = mixer.out_proj(y)
        self._final_norm_and_head(hidden, residual)

    def _step_hybrid(self):
        """The "kernels" step with the conv + SSM part on this package's kernel (for large batches): cuBLAS
        projections, mamba-ssm's fused add + RMSNorm and gated RMSNorm, `conv_ssm_step` in between."""
        k = self._kernels
        lm = self.model.model.language_model
        adapter_offset = self._adapter_offset()
        hidden, residual = self._embed(), None
        for i, layer in enumerate(lm.layers):
            mixer = layer.mixer
            x, residual = self._add_norm(layer, hidden, residual)
            torch.matmul(x, self._fused_in_proj[i].t(), out=self._proj)  # [z ‖ xBC ‖ dt ‖ down_mmu ‖ down_t2i]
            self._conv_ssm(i, mixer, adapter_offset)
            # the B/C conv channels are shared by all heads: shifted after the kernel (which reads their old window)
            bc = self.conv[i][:, mixer.intermediate_size :]
            bc.copy_(torch.cat([bc[..., 1:], self._bc_new[..., None]], dim=-1))
            y = k.rmsnorm_fn(
                self._gated, mixer.norm.weight, None, eps=mixer.norm.variance_epsilon, group_size=mixer.norm.group_size,
                norm_before_gate=False,
            )  # fmt: skip  (the gate is already in `_gated`)
            hidden = mixer.out_proj(y.to(self.dtype))
        self._final_norm_and_head(hidden, residual)

    def _step_fused(self):
        """The same step in 3 Triton launches per layer (+ embedding and head); see triton_decode_omnimamba.py."""
        lm = self.model.model.language_model
        adapter_offset = self._adapter_offset()
        launch = launch_configs(self.batch_size, self.dtype, self._residual.device)
        table, offset, positions = self._embedding_tables()
        if table is None:
            self._residual.copy_(self._embed())
        else:  # one launch for the lookup, the position add and the float32 cast
            embed_rows(self.ids, self.positions, table, positions, self._residual, offset)
        for i, layer in enumerate(lm.layers):
            mixer = layer.mixer
            rmsnorm_gemv(
                self._residual, layer.norm.weight, self._fused_in_proj[i], self._proj, layer.norm.variance_epsilon,
                workspace=self._split_k, **launch["in_proj"],
            )  # fmt: skip
            self._conv_ssm(i, mixer, adapter_offset)
            gated_norm_gemv(
                self._gated, mixer.norm.weight, mixer.out_proj.weight, self._residual, self.conv[i], self._bc_new,
                mixer.norm.variance_epsilon, d_inner=mixer.intermediate_size, out_dtype=self.dtype, workspace=self._split_k,
                gated_sumsq=self._gated_sumsq, **launch["out_proj"],
            )  # fmt: skip
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        rmsnorm_gemv(
            self._residual, lm.norm_f.weight, head.weight, self.logits, lm.norm_f.variance_epsilon,
            workspace=self._split_k, **launch["head"],
        )

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Feed `ids` [B] at `positions` ([B] or an int); return the next-token logits (a view of a static buffer:
        valid until the next call)."""
        self.ids.copy_(ids)
        self._set_positions(positions)
        self._run("step", self._fn)
        return self.logits

    @torch.no_grad()
    def decode(
        self, first: torch.Tensor, positions: torch.Tensor | int, steps: int, choose=None, key="argmax",
        offset: int = 0, eos=(), pad: int = 0,
    ) -> torch.Tensor:
        """Decode `steps` tokens with every choice made inside the graph, so that the host only replays graphs
        (`DECODE_CHUNK` steps per replay). `first` [R]: the choice before the first step (head indices), fed as
        `first + offset` at `positions` (with R < B, e.g. classifier-free guidance, the B / R row groups are fed
        the same choices). Each step: `choose(logits) -> [R]` (default argmax; it must be capturable: no host
        syncs, and `key`, hashable, must name it: one graph per key) — or a `FusedChoice`, which makes the choice and
        everything after it in one Triton launch —, `pad` for a row that has finished (one that
        chose an id in `eos`, `first` included), fed back at the next position. Returns the choices [R, n]:
        n = `steps`, or fewer once every row has finished (checked before the first step and after each replay when
        `eos` is given; the columns after that would all be `pad`). Same tokens as `step()` + the choice on the host, without the
        per-token host round trip and its small kernels (docs/BENCHMARKS.md)."""
        rows = self._tokens.shape[1]  # the position table's
        last = (positions if isinstance(positions, int) else int(positions.max())) + steps - 1
        if steps > 0 and last >= rows:
            raise ValueError(f"decode() would feed position {last}; the {self.task} position table has {rows} rows.")
        r = first.shape[0]
        if self.batch_size % r:
            raise ValueError(f"decode() feeds {r} choices to a batch of {self.batch_size} rows: not a divisor.")
        eos = tuple(sorted({int(e) for e in eos}))
        if eos and eos not in self._eos:
            padded = eos + (-1,) * ((1 << (len(eos) - 1).bit_length()) - len(eos))  # no choice is -1
            self._eos[eos] = torch.tensor(padded, device=self.ids.device)
        if isinstance(choose, FusedChoice) and choose.do_sample:
            self._seed.random_(0, 2**62)  # from torch's generator: seeded calls repeat
        self.ids.copy_(first.repeat(self.batch_size // r) + offset)
        self._set_positions(positions)
        self._k.zero_()
        self._unfinished.fill_(True)
        if eos:
            self._unfinished[:r] = (first[:, None] != self._eos[eos]).all(-1)
            if not bool(self._unfinished[:r].any()):  # every row chose eos first
                steps = 0
        choose = choose or _argmax
        key = choose if isinstance(choose, FusedChoice) else key
        done = 0
        while done < steps:
            # never a step past `steps`: its position may not exist (the remainder runs on a one-step graph)
            n = DECODE_CHUNK if steps - done >= DECODE_CHUNK else 1
            run = functools.partial(self._decode_steps, n, choose, r, eos, pad, offset)
            self._run(("decode", n, key, r, eos, pad, offset), run)
            done += n
            if eos and not bool(self._unfinished[:r].any()):
                break
        return self._tokens[:r, :done].clone()

    def _decode_steps(self, n: int, choose, r: int, eos: tuple, pad: int, offset: int) -> None:
        tokens, unfinished, steps = self._tokens[:r], self._unfinished[:r], self._k[:r]
        eos_ids = self._eos[eos] if eos else None
        for _ in range(n):
            self._fn()
            if isinstance(choose, FusedChoice):  # everything below in one launch
                choose_and_feed(
                    self.logits, tokens, steps, self.ids, self.positions, unfinished, self._seed, eos_ids,
                    do_sample=choose.do_sample, temperature=choose.temperature, top_k=choose.top_k, offset=offset,
                    pad=pad,
                )  # fmt: skip
                continue
            choice = choose(self.logits)
            if eos:
                choice = torch.where(unfinished, choice, pad)
                unfinished &= (choice[:, None] != eos_ids).all(-1)
            tokens.scatter_(1, steps[:, None], choice[:, None])
            steps += 1
            torch.add(choice.repeat(self.batch_size // r), offset, out=self.ids)
            self.positions += 1

    def _set_positions(self, positions: torch.Tensor | int) -> None:
        if isinstance(positions, int):
            self.positions.fill_(positions)
        else:
            self.positions.copy_(positions)

    def _run(self, key, fn) -> None:
        """`fn()`, replayed from a graph captured on first use (eagerly where there are no graphs)."""
        if not self._use_graph:
            fn()
            return
        if key not in self._graphs:
            # the warm-up runs must not disturb the states, the decode() buffers or the random numbers (sampling):
            # restored before each and after
            mutable = (self.conv, self.ssm, self.ids, self.positions, self._tokens, self._k, self._unfinished)
            saved = [t.clone() for t in mutable]
            device = self.ids.device
            rng = torch.cuda.get_rng_state(device)

            def restore():
                torch._foreach_copy_(list(mutable), saved)
                torch.cuda.set_rng_state(rng, device)

            self._graphs[key], _ = capture_graph(fn, warmup=3, before_each=restore)
            restore()
        self._graphs[key].replay()

    def release(self) -> None:
        """Free the captured graphs now (not whenever the garbage collector gets to this object)."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs = {}


@dataclasses.dataclass(frozen=True)
class FusedChoice:
    """A token choice that `decode()` makes in one Triton launch per step (`triton_choice_omnimamba`): greedy, or
    sampling after a temperature and top-k (Gumbel-max with Triton's generator: the same distribution as
    `torch.multinomial`, other draws)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def capture_graph(fn, pool=None, warmup: int = 3, before_each=None):
    """Run `fn` `warmup` times on a side stream (compilation, autotuning, cuBLAS handles; `before_each()` before each
    run, not captured), then capture it in a CUDA graph (memory from `pool` if given); returns `(graph, fn's
    outputs)`. Python's cyclic garbage collector stays off during the capture: dropped decoders and prefill graphs
    sit in reference cycles with the model, and collected mid-capture their CUDAGraph destructors invalidate it
    ("operation not permitted when stream is capturing"; seen on the H100 when a batch-8 decoder was captured right
    after `reset_graph_decoders()`). torch.cuda.graph no longer runs gc.collect() itself."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            if before_each is not None:
                before_each()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    finally:
        if enabled:
            gc.enable()
    return graph, out


def _layer_step(
    residual, norm_w, in_w, down_w, up_w, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, out_w, conv_state, ssm_state, c
):
    """One block for one token: prenorm, in_proj + task LoRA, conv-state shift, SSM recurrence, gated norm, out_proj.
    Same formulas as `OmniMambaMixer._step` (spec §3.2–3.4). Updates `conv_state` / `ssm_state` in place and returns
    the new float32 residual."""
    eps, scaling, d_inner, conv_dim, heads, p, n, g, group, limit, dtype = c
    x = _rms_norm(residual, norm_w, eps).to(dtype)
    zxbcdt = F.linear(x, in_w) + scaling * F.linear(F.linear(x, down_w), up_w)
    z, xBC, dt = zxbcdt.split([d_inner, conv_dim, heads], dim=-1)
    window = torch.cat([conv_state[:, :, 1:], xBC[:, :, None]], dim=-1)
    conv_state.copy_(window)
    xBC = (window.float() * conv_w[:, 0].float()).sum(-1)
    if conv_b is not None:
        xBC = xBC + conv_b.float()
    xBC = F.silu(xBC).to(dtype)
    xs, B, C = xBC.split([d_inner, g * n, g * n], dim=-1)
    xs = xs.view(-1, heads, p).float()
    B = B.view(-1, g, n).float().repeat_interleave(heads // g, dim=1)
    C = C.view(-1, g, n).float().repeat_interleave(heads // g, dim=1)
    delta = F.softplus(dt.float() + dt_bias.float())
    if limit != (0.0, float("inf")):
        delta = delta.clamp(*limit)
    A = -torch.exp(A_log.float())
    state = ssm_state.float() * torch.exp(delta * A)[..., None, None]
    state = state + (delta[..., None] * xs)[..., None] * B[:, :, None]
    ssm_state.copy_(state)  # rounded once if the state is kept in the model dtype; y reads the float32 update
    y = ((state * C[:, :, None]).sum(-1) + D.float()[:, None] * xs).reshape(xs.shape[0], -1).to(dtype)
    # gated RMSNorm, norm_before_gate=False (§3.4 step 6)
    gated = (y.float() * F.silu(z.float())).unflatten(-1, (-1, group))
    gated = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    y = (gated.flatten(-2) * gnorm_w.float()).to(dtype)
    return residual + F.linear(y, out_w)


def _fused_supports(mixer) -> bool:
    """The fused Triton step's shape assumptions (true for every released OmniMamba configuration)."""
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    rank = next(iter(mixer.in_proj.task_adapters.values())).down.weight.shape[0]
    return (
        all(pow2(v) for v in (mixer.head_dim, mixer.ssm_state_size, rank, mixer.conv_kernel_size))
        and mixer.norm.group_size == mixer.intermediate_size
        and mixer.num_heads % mixer.n_groups == 0
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


__all__ = [
    "FusedChoice", "OmniMambaGraphDecoder", "capture_graph", "fused_in_proj", "image_code_table", "ssm_decay_rates",
    "uses_image_code_table",
]
