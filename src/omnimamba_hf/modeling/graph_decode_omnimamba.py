"""CUDA-graph decoding over a static recurrent state: the GPU fast path of `generate()` for both tasks.

A recurrent model decodes with a constant-size state, so one decode step has fully static shapes: the token ids and
positions of the batch, the conv state `[layers, B, conv_dim, K]` and the SSM state `[layers, B, heads, head_dim,
d_state]` (float32). The step is written as one function over preallocated buffers, compiled with `torch.compile`
(which fuses the norm / conv / state-update elementwise work into a few kernels per layer) and captured once in a CUDA
graph, so a decode step costs one graph replay: launch overhead disappears and the step approaches the time to read
the weights once (the memory floor). The task LoRA stays exact: `x Wᵀ + s · up(down(x))` with the task's adapter,
not merged into the base weight.

The prefill (prompt, image features, chunked scan) runs eagerly through the normal forward; its final states are
copied into the static buffers. Decoders are cached on the model per (task, batch size, dtype, device).
"""

import torch
import torch.nn.functional as F


class OmniMambaGraphDecoder:
    """Decode steps of one task for a fixed batch size as a replayable CUDA graph (or eagerly, for tests on CPU)."""

    def __init__(self, model, task: str, batch_size: int, compile: bool = True, use_graph: bool = True):
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
        self.ssm = torch.zeros(
            n, batch_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=device, dtype=torch.float32
        )
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        width = config.text_vocab_size if task == "mmu" else config.image_vocab_size
        self.logits = torch.zeros(batch_size, width, device=device, dtype=self.dtype)
        self.batch_size = batch_size
        self._fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self._graph = None
        self._use_graph = use_graph and device.type == "cuda"

    # -- state in / out -------------------------------------------------------------------------------------------------

    def load_state(self, cache) -> None:
        """Copy the final states of an eager prefill (a transformers `DynamicCache`) into the static buffers."""
        for i, layer in enumerate(cache.layers):
            self.conv[i].copy_(layer.conv_states[0])
            self.ssm[i].copy_(layer.recurrent_states[0])

    # -- the step -------------------------------------------------------------------------------------------------------

    def _step(self):
        """One token per row at `self.positions`; writes `self.logits`, updates the states in place."""
        m = self.model.model
        lm = m.language_model
        config = self.model.config
        if self.task == "mmu":
            h = lm.embeddings(self.ids) + m.mmu_position_embeddings[0][self.positions].to(self.dtype)
        else:
            codes = self.ids - config.text_vocab_size
            h = m.image_embeddings(codes).to(self.dtype) + m.t2i_position_embeddings[0][self.positions].to(self.dtype)
        residual = h.float()
        for i, layer in enumerate(lm.layers):
            mixer = layer.mixer
            x = _rms_norm(residual, layer.norm.weight, layer.norm.variance_epsilon).to(self.dtype)
            adapter = mixer.in_proj.task_adapters[self.task]
            zxbcdt = F.linear(x, mixer.in_proj.weight) + mixer.in_proj.scaling * adapter.up(adapter.down(x))
            z, xBC, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
            # conv over the last K pre-activation columns (the cached K-1 and this one)
            window = torch.cat([self.conv[i, :, :, 1:], xBC[:, :, None]], dim=-1)
            self.conv[i].copy_(window)
            xBC = (window.float() * mixer.conv1d.weight[:, 0].float()).sum(-1)
            if mixer.conv1d.bias is not None:
                xBC = xBC + mixer.conv1d.bias.float()
            xBC = F.silu(xBC).to(self.dtype)
            xs, B, C = xBC.split(mixer._xbc_sizes, dim=-1)
            heads, p, n, g = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
            xs = xs.view(-1, heads, p).float()
            B = B.view(-1, g, n).float().repeat_interleave(heads // g, dim=1)
            C = C.view(-1, g, n).float().repeat_interleave(heads // g, dim=1)
            delta = F.softplus(dt.float() + mixer.dt_bias.float())
            if mixer.time_step_limit != (0.0, float("inf")):
                delta = delta.clamp(*mixer.time_step_limit)
            A = -torch.exp(mixer.A_log.float())
            state = self.ssm[i] * torch.exp(delta * A)[..., None, None] + (delta[..., None] * xs)[..., None] * B[:, :, None]
            self.ssm[i].copy_(state)
            y = (state * C[:, :, None]).sum(-1) + mixer.D.float()[:, None] * xs
            y = mixer.norm(y.reshape(y.shape[0], -1).to(self.dtype), z)
            residual = residual + mixer.out_proj(y)
        hidden = _rms_norm(residual, lm.norm_f.weight, lm.norm_f.variance_epsilon).to(self.dtype)
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        self.logits.copy_(head(hidden))

    def step(self, ids: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Feed `ids` [B] at `positions` ([B] or an int); return the next-token logits (a view of a static buffer:
        valid until the next call)."""
        self.ids.copy_(ids)
        if isinstance(positions, int):
            self.positions.fill_(positions)
        else:
            self.positions.copy_(positions)
        if not self._use_graph:
            self._fn()
            return self.logits
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self.logits

    def _capture(self) -> None:
        # warm up (compilation, autotuning, cuBLAS handles) on a side stream without disturbing the states
        saved = (self.conv.clone(), self.ssm.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._fn()
        self.conv.copy_(saved[0])
        self.ssm.copy_(saved[1])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


__all__ = ["OmniMambaGraphDecoder"]
