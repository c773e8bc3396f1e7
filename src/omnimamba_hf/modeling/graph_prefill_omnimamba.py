"""CUDA-graph prefill: the prompt pass before decoding, replayed from captured graphs instead of launched op by op.

An eager prefill of OmniMamba-1.3B is bound by the host, not the GPU: ~35 launches per block × 48 blocks plus ~50
vision-tower layers take ~100 ms to enqueue, while the GPU needs a few ms (docs/BENCHMARKS.md). Here

* the vision towers run as one graph per number of images (inputs are always `S × S` pixels);
* the Mamba stack runs over the prompt in chunks, each chunk one graph that continues the recurrent state the previous
  chunk left: powers of two from 1024 down to `min_chunk` (64), then the remainder in one chunk (797 positions =
  512 + 256 + 29). That is exact: a chunked scan from an initial state is the same recurrence (tests check chunked ==
  one-shot). A chunk's cost is mostly its ~800 launches (~4 ms on an H100 whatever its length), so few chunks matter
  more than few graphs: at most 5 power-of-two graphs + one per remainder length seen (< 64) per (task, batch size,
  padded or not), each captured on first use. T2I prompts (all of one length) run as one chunk.

The embeddings (token tables, caption MLP, image-feature scatter, position tables) and the input validation stay
eager: a handful of launches. The recurrent states live in a transformers `DynamicCache` whose tensors never move
(its updates copy in place), which the decoders load from as from an eager prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .graph_decode_omnimamba import capture_graph, fused_in_proj, mamba_kernels_for_decode, ssm_decay_rates
from .mixer_omnimamba import TASKS, ssm_state_dtype

MIN_CHUNK = 64


def chunk_lengths(length: int, min_chunk: int = MIN_CHUNK) -> list[int]:
    """`length` as powers of two from 1024 down to `min_chunk` (largest first), then the remainder (< min_chunk)."""
    out = []
    c = 1024
    while c >= min_chunk:
        while length >= c:
            out.append(c)
            length -= c
        c //= 2
    return out + ([length] if length else [])


class OmniMambaGraphPrefill:
    """Prefill of one task for a fixed batch size: `__call__(inputs_embeds, attention_mask)` → last-position logits,
    with the final recurrent states in `self.cache`. `use_graph=False` runs the same chunks eagerly (CPU tests)."""

    def __init__(self, model, task: str, batch_size: int, use_graph: bool = True):
        self.model = model
        self.task = task
        self.batch_size = batch_size
        lm = model.model.language_model
        self.device = lm.embeddings.weight.device
        self.dtype = lm.embeddings.weight.dtype
        self.use_graph = use_graph and self.device.type == "cuda"
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.state_dtype = ssm_state_dtype(model.config, self.dtype)  # float32 unless config.ssm_state_dtype="model"
        for i, layer in enumerate(lm.layers):  # static, zero states: every chunk, the first included, continues them
            m = layer.mixer
            self.cache.update_conv_state(
                torch.zeros(batch_size, m.conv_dim, m.conv_kernel_size, device=self.device, dtype=self.dtype), i,
                conv_kernel_size=m.conv_kernel_size,
            )  # fmt: skip
            shape = (batch_size, m.num_heads, m.head_dim, m.ssm_state_size)
            self.cache.update_recurrent_state(torch.zeros(shape, device=self.device, dtype=self.state_dtype), i)
        self._states = [(l.conv_states[0], l.recurrent_states[0]) for l in self.cache.layers]
        self.min_chunk = MIN_CHUNK
        self._chunks = {}  # (length, masked) -> (graph or None, embeds buffer, mask buffer, logits)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        # Unpadded chunks on CUDA run a kernel-fused block (~14 launches instead of ~35; the chunk's cost is mostly
        # launches): mamba-ssm's add+RMSNorm, scan and gated norm, causal-conv1d with the cached columns as its
        # initial state, one GEMM for in_proj + both adapters' `down` (fused_in_proj).
        self._kernels = mamba_kernels_for_decode() if self.device.type == "cuda" else None
        self._fused = fused_in_proj(model) if self._kernels is not None else None
        self._conv_width = lm.layers[0].mixer.conv_kernel_size
        # causal-conv1d takes initial states only in channel-last layout with strides that are multiples of 8
        self._conv_dim_ok = lm.layers[0].mixer.conv_dim % 8 == 0
        self._A = ssm_decay_rates(model) if self._kernels is not None else None

    def _run_chunk(self, embeds, mask):
        # chunks shorter than the conv window (remainders of 1-3 positions) take the mixer's own continuation path
        # (and models whose conv width in channels is not a multiple of 8, see _run_chunk_kernels)
        if self._kernels is not None and mask is None and embeds.shape[1] >= self._conv_width and self._conv_dim_ok:
            return self._run_chunk_kernels(embeds)
        lm = self.model.model.language_model
        hidden, _ = lm(embeds, self.task, self.cache, mask, False)
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        return head(hidden[:, -1])

    def _run_chunk_kernels(self, embeds):
        """The same arithmetic as `OmniMambaBlock` + `OmniMambaMixer._scan` continuing the cached states (spec
        §3.2–3.4), on fused kernels."""
        k = self._kernels
        lm = self.model.model.language_model
        batch, length, _ = embeds.shape
        hidden, residual = embeds, None
        for i, layer in enumerate(lm.layers):
            m = layer.mixer
            conv_state, ssm_state = self._states[i]
            x, residual = k.layer_norm_fn(
                hidden, layer.norm.weight, None, residual=residual, prenorm=True, residual_in_fp32=True,
                eps=layer.norm.variance_epsilon, is_rms_norm=True,
            )  # fmt: skip
            width = m.in_proj.weight.shape[0]
            rank = m.in_proj.task_adapters[self.task].down.weight.shape[0]
            start = width + rank * TASKS.index(self.task)
            both = F.linear(x, self._fused[i]).view(batch * length, -1)  # [z ‖ xBC ‖ dt ‖ down_mmu ‖ down_t2i]
            zxbcdt = torch.addmm(
                both[:, :width], both[:, start : start + rank], m.in_proj.task_adapters[self.task].up.weight.t(),
                alpha=m.in_proj.scaling,
            ).view(batch, length, width)  # fmt: skip
            z, xBC, dt = zxbcdt.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
            xt = xBC.transpose(1, 2)  # channel-last [B, C, L], as causal-conv1d wants it with initial states
            if xt.stride(0) % 8 or xt.stride(2) % 8:  # in_proj rows not a multiple of 8 (e.g. the demo's model)
                xt = xBC.contiguous().transpose(1, 2)
            initial = conv_state[..., 1:].transpose(1, 2).contiguous().transpose(1, 2)
            last = xt[..., -m.conv_kernel_size :]  # the new conv state (chunks here are at least the window long)
            xBC = k.conv1d_fn(xt, m.conv1d.weight.squeeze(1), m.conv1d.bias, initial_states=initial, activation="silu")
            conv_state.copy_(last)
            xs, B, C = xBC.transpose(1, 2).split(m._xbc_sizes, dim=-1)
            y, final = k.chunk_scan(
                xs.reshape(batch, length, m.num_heads, m.head_dim), dt, self._A[i],
                B.reshape(batch, length, m.n_groups, -1), C.reshape(batch, length, m.n_groups, -1), m.chunk_size,
                D=m.D, z=None, dt_bias=m.dt_bias, initial_states=ssm_state, dt_softplus=True,
                dt_limit=m.time_step_limit, return_final_states=True,
            )  # fmt: skip
            ssm_state.copy_(final)
            y = k.rmsnorm_fn(
                y.reshape(batch, length, -1), m.norm.weight, None, z=z, eps=m.norm.variance_epsilon,
                group_size=m.norm.group_size, norm_before_gate=False,
            )  # fmt: skip
            hidden = m.out_proj(y)
        hidden = k.layer_norm_fn(
            hidden[:, -1], lm.norm_f.weight, None, residual=residual[:, -1], prenorm=False, residual_in_fp32=True,
            eps=lm.norm_f.variance_epsilon, is_rms_norm=True,
        )  # fmt: skip
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        return head(hidden)

    def chunk_lengths(self, length: int) -> list[int]:
        """How a prompt of `length` positions is split. T2I prompts all have the same length (72 for the released
        model), so a T2I prefill is one chunk, one graph: a second chunk would cost its ~700 launches (~4 ms on an
        H100) again. MMU prompt lengths vary: power-of-two chunks bound the number of graphs."""
        if self.task == "t2i" and length <= 1024:
            return [length]
        return chunk_lengths(length, self.min_chunk)

    def _chunk(self, length: int, masked: bool):
        key = (length, masked)
        if key not in self._chunks:
            hidden = self.model.config.text_config.hidden_size
            embeds = torch.zeros(self.batch_size, length, hidden, device=self.device, dtype=self.dtype)
            mask = torch.ones(self.batch_size, length, device=self.device, dtype=torch.long) if masked else None
            graph, logits = None, None
            if self.use_graph:
                saved = [(c.clone(), s.clone()) for c, s in self._states]  # warm-up must not disturb a prefill
                graph, logits = capture_graph(lambda: self._run_chunk(embeds, mask), self._pool, warmup=2)
                for (c, s), (c0, s0) in zip(self._states, saved):
                    c.copy_(c0)
                    s.copy_(s0)
            self._chunks[key] = (graph, embeds, mask, logits)
        return self._chunks[key]

    def release(self) -> None:
        """Free the captured graphs now."""
        for graph, *_ in self._chunks.values():
            if graph is not None:
                graph.reset()
        self._chunks = {}

    @torch.no_grad()
    def __call__(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` [batch, length, hidden] (position tables added); `attention_mask` [batch, length] or None
        (nothing padded). Returns the logits of the last position [batch, vocab of the task] (a fresh tensor)."""
        if inputs_embeds.shape[0] != self.batch_size:
            raise ValueError(f"This prefill was built for batch size {self.batch_size}, got {inputs_embeds.shape[0]}.")
        if self._fused is not None:
            fused = fused_in_proj(self.model)  # refreshes the adapters' rows; new buffers if weights were replaced
            rates = ssm_decay_rates(self.model)  # refreshed in place: the graphs read these buffers
            if fused is not self._fused or rates is not self._A:  # new buffers: the graphs must be captured again
                self.release()
                self._fused, self._A = fused, rates
        for c, s in self._states:
            c.zero_()
            s.zero_()
        masked = attention_mask is not None
        start = 0
        for length in self.chunk_lengths(inputs_embeds.shape[1]):
            graph, embeds, mask, logits = self._chunk(length, masked and length > 1)
            embeds.copy_(inputs_embeds[:, start : start + length])
            if mask is not None:
                mask.copy_(attention_mask[:, start : start + length])
            if graph is not None:
                graph.replay()
            else:
                logits = self._run_chunk(embeds, mask)
            start += length
        return logits.clone()


class OmniMambaGraphVision:
    """The vision towers + projector (`get_image_features`) for a fixed number of images, as one CUDA graph."""

    def __init__(self, model, n_images: int):
        self.model = model
        config = model.config
        size = config.vision_config.image_size
        param = model.model.projector.linear_1.weight
        self.pixels = torch.zeros(n_images, 2, 3, size, size, device=param.device, dtype=param.dtype)
        self.graph, self.features = capture_graph(lambda: model.model.get_image_features(self.pixels), warmup=2)

    def release(self) -> None:
        self.graph.reset()

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape != self.pixels.shape:
            raise ValueError(f"Expected pixel_values of shape {tuple(self.pixels.shape)}, got {tuple(pixel_values.shape)}.")
        self.pixels.copy_(pixel_values)
        self.graph.replay()
        return self.features.clone()


__all__ = ["MIN_CHUNK", "OmniMambaGraphPrefill", "OmniMambaGraphVision", "chunk_lengths"]
