"""Training the demo's tiny VQ (LlamaGen architecture, `OmniMambaVQVAE`) on the digits.

The released VQ-16 comes pretrained (LlamaGen); the demo's tiny one starts random, so it is trained first, as LlamaGen
trains its tokenizer: reconstruction loss through the straight-through quantiser plus the quantiser's own
codebook + β·commitment loss on L2-normalised vectors (the `embedding_loss` of `OmniMambaVQVAEVectorQuantizer`, spec
§6.2). No perceptual/GAN losses (8×8 digits have no texture to speak of). Codes unused during the last stretch of
training are restarted on random encoder outputs (a standard VQ-VAE remedy against dead codes), so the small codebook
is fully used.

Each step runs `OmniMambaVQVAE.reconstruct` (LlamaGen's `VQModel.forward`: the decoder reads the straight-through
quantiser output, so the reconstruction loss reaches the encoder), which also returns the codes and the latent that
the dead-code restarts need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omnimamba_hf.modeling.vq_omnimamba import OmniMambaVQVAE


@torch.no_grad()
def _restart_dead_codes(vq: OmniMambaVQVAE, usage: torch.Tensor, latents: torch.Tensor, generator) -> int:
    dead = (usage == 0).nonzero().view(-1)
    if dead.numel() == 0 or latents.numel() == 0:
        return 0
    pick = torch.randint(0, latents.shape[0], (dead.numel(),), generator=generator)
    vq.quantize.embedding.weight[dead] = F.normalize(latents[pick], dim=-1).to(vq.quantize.embedding.weight.dtype)
    return int(dead.numel())


def train_vq(
    vq: OmniMambaVQVAE,
    pixel_values: torch.Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    restart_every: int = 100,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 0,
) -> dict:
    """Train `vq` in place on `pixel_values` `(N, 3, S, S)` in [-1, 1]. Returns a small report (final losses, codebook
    use). AdamW (betas 0.9/0.95, LlamaGen's), cosine decay to 10%, batch `batch_size`."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    vq.train()
    vq.requires_grad_(True)
    params = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    n = pixel_values.shape[0]
    n_codes = vq.config.num_embeddings
    usage = torch.zeros(n_codes, dtype=torch.long)
    recent: list[torch.Tensor] = []
    restarted = 0
    order = torch.randperm(n, generator=generator)
    cursor = 0
    bar = tqdm(range(steps), desc="VQ tokenizer", disable=not progress, dynamic_ncols=True)
    rec_loss = emb = torch.tensor(0.0)
    for step in bar:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        batch = pixel_values[order[cursor : cursor + batch_size]]
        cursor += batch_size
        recon, emb, codes, latent = vq.reconstruct(batch)
        rec_loss = F.mse_loss(recon, batch)
        loss = rec_loss + emb
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        usage += torch.bincount(codes.view(-1).cpu(), minlength=n_codes)
        recent.append(latent.detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1]))
        recent = recent[-4:]
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < int(0.8 * steps):
            restarted += _restart_dead_codes(vq, usage, torch.cat(recent), generator)
            usage.zero_()
        if progress and step % 20 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{emb.item():.4f}")
        if log_every and step % log_every == 0:
            print(f"step {step} rec {rec_loss.item():.4f} vq {emb.item():.4f}")
    vq.eval()
    vq.requires_grad_(False)
    return {
        "steps": steps,
        "reconstruction_mse": float(rec_loss.detach()),
        "embedding_loss": float(emb.detach()),
        "codes_restarted": restarted,
    }


@torch.no_grad()
def codebook_usage(vq: OmniMambaVQVAE, pixel_values: torch.Tensor, batch_size: int = 256) -> int:
    """How many distinct codes `encode_to_codes` uses on `pixel_values`."""
    used = set()
    for i in range(0, pixel_values.shape[0], batch_size):
        used.update(vq.encode_to_codes(pixel_values[i : i + batch_size]).view(-1).tolist())
    return len(used)


__all__ = ["codebook_usage", "train_vq"]
