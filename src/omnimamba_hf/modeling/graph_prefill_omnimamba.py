"""CUDA-graph prefill: the prompt pass before decoding, replayed from captured graphs instead of launched op by op.

An eager prefill of OmniMamba-1.3B is bound by the host, not the GPU: ~35 launches per block × 48 blocks plus ~50
vision-tower layers take ~100 ms to enqueue, while the GPU needs a few ms (docs/BENCHMARKS.md). Here

* the vision towers run as one graph per number of images (inputs are always `S × S` pixels);
* the Mamba stack runs over the prompt in chunks whose lengths are powers of two, largest first (797 positions =
  512 + 256 + 16 + 8 + 4 + 1), each chunk one graph that continues the recurrent state the previous chunk left. That
  is exact: a chunked scan from an initial state is the same recurrence (tests/test_generation.py checks chunked ==
  one-shot). So at most `len(CHUNKS)` graphs per (task, batch size, padded or not) serve every prompt length; each
  is captured on first use.

The embeddings (token tables, caption MLP, image-feature scatter, position tables) and the input validation stay
eager: a handful of launches. The recurrent states live in a transformers `DynamicCache` whose tensors never move
(its updates copy in place), which the decoders load from as from an eager prefill.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

CHUNKS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def chunk_lengths(length: int) -> list[int]:
    """`length` as a sum of `CHUNKS`, largest first (its binary digits)."""
    out = []
    for c in CHUNKS:
        while length >= c:
            out.append(c)
            length -= c
    return out


def _capture(fn, pool):
    """Warm `fn` up on a side stream (compilation, autotuning), then capture it; returns (graph, its outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


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
        state_dtype = torch.promote_types(self.dtype, torch.float32)  # SSM states: float32 (float64 for float64)
        for i, layer in enumerate(lm.layers):  # static, zero states: every chunk, the first included, continues them
            m = layer.mixer
            self.cache.update_conv_state(
                torch.zeros(batch_size, m.conv_dim, m.conv_kernel_size, device=self.device, dtype=self.dtype), i,
                conv_kernel_size=m.conv_kernel_size,
            )  # fmt: skip
            self.cache.update_recurrent_state(
                torch.zeros(batch_size, m.num_heads, m.head_dim, m.ssm_state_size, device=self.device, dtype=state_dtype),
                i,
            )  # fmt: skip
        self._states = [(l.conv_states[0], l.recurrent_states[0]) for l in self.cache.layers]
        self._chunks = {}  # (length, masked) -> (graph or None, embeds buffer, mask buffer, logits)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None

    def _run_chunk(self, embeds, mask):
        lm = self.model.model.language_model
        hidden, _ = lm(embeds, self.task, self.cache, mask, False)
        head = self.model.lm_head if self.task == "mmu" else self.model.image_head
        return head(hidden[:, -1])

    def _chunk(self, length: int, masked: bool):
        key = (length, masked)
        if key not in self._chunks:
            hidden = self.model.config.text_config.hidden_size
            embeds = torch.zeros(self.batch_size, length, hidden, device=self.device, dtype=self.dtype)
            mask = torch.ones(self.batch_size, length, device=self.device, dtype=torch.long) if masked else None
            graph, logits = None, None
            if self.use_graph:
                saved = [(c.clone(), s.clone()) for c, s in self._states]  # warm-up must not disturb a prefill
                graph, logits = _capture(lambda: self._run_chunk(embeds, mask), self._pool)
                for (c, s), (c0, s0) in zip(self._states, saved):
                    c.copy_(c0)
                    s.copy_(s0)
            self._chunks[key] = (graph, embeds, mask, logits)
        return self._chunks[key]

    @torch.no_grad()
    def __call__(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` [batch, length, hidden] (position tables added); `attention_mask` [batch, length] or None
        (nothing padded). Returns the logits of the last position [batch, vocab of the task] (a fresh tensor)."""
        if inputs_embeds.shape[0] != self.batch_size:
            raise ValueError(f"This prefill was built for batch size {self.batch_size}, got {inputs_embeds.shape[0]}.")
        for c, s in self._states:
            c.zero_()
            s.zero_()
        masked = attention_mask is not None
        start = 0
        for length in chunk_lengths(inputs_embeds.shape[1]):
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
        self.graph, self.features = _capture(lambda: model.model.get_image_features(self.pixels), None)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape != self.pixels.shape:
            raise ValueError(f"Expected pixel_values of shape {tuple(self.pixels.shape)}, got {tuple(pixel_values.shape)}.")
        self.pixels.copy_(pixel_values)
        self.graph.replay()
        return self.features.clone()


__all__ = ["CHUNKS", "OmniMambaGraphPrefill", "OmniMambaGraphVision", "chunk_lengths"]
