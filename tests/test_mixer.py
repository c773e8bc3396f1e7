"""The Mamba-2 mixer against an independent per-timestep recurrence written here from ORIGINAL-SPEC §3.3–3.4, in
float64: whole-sequence (chunked) evaluation, prefill + single steps from the cache, and multi-token continuation."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from common import tiny_config
from omnimamba_hf.modeling.mixer_omnimamba import TASKS, OmniMambaMixer, ssd_chunked_scan, ssd_step


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (adapters included), so a wrong index or a dropped term cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() > 1 else 0.3))
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g).add(1).mul(15).log() / 3)  # modest decay
            if name.endswith("norm.weight"):
                p.add_(1.0)


def reference_mixer(m: OmniMambaMixer, u: torch.Tensor, task: str) -> torch.Tensor:
    """Plain loop over time steps (spec §3.4), float64, no chunking, no cache object."""
    u = u.double()
    W = m.in_proj.weight.double()
    ad = m.in_proj.task_adapters[task]
    zxbcdt = u @ W.T + m.in_proj.scaling * (u @ ad.down.weight.double().T) @ ad.up.weight.double().T
    d_in, conv_dim, H = m.intermediate_size, m.conv_dim, m.num_heads
    z, xBC, dt = zxbcdt.split([d_in, conv_dim, H], dim=-1)
    K = m.conv_kernel_size
    w, b = m.conv1d.weight.double()[:, 0], m.conv1d.bias.double()
    Bsz, L, _ = u.shape
    padded = F.pad(xBC, (0, 0, K - 1, 0))
    conv = torch.stack([(padded[:, t : t + K].transpose(1, 2) * w).sum(-1) + b for t in range(L)], dim=1)
    xBC = F.silu(conv)
    x, Bm, Cm = xBC.split([d_in, m.n_groups * m.ssm_state_size] * 1 + [m.n_groups * m.ssm_state_size], dim=-1)
    P, N, G = m.head_dim, m.ssm_state_size, m.n_groups
    x = x.view(Bsz, L, H, P)
    Bm = Bm.view(Bsz, L, G, N).repeat_interleave(H // G, dim=2)
    Cm = Cm.view(Bsz, L, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + m.dt_bias.double())
    A = -torch.exp(m.A_log.double())
    h = torch.zeros(Bsz, H, P, N, dtype=torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append((h * Cm[:, t, :, None, :]).sum(-1) + m.D.double()[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(Bsz, L, d_in)
    g = y * F.silu(z)
    g = g.unflatten(-1, (G, -1))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)
    g = g.flatten(-2) * m.norm.weight.double()
    return g @ m.out_proj.weight.double().T


@pytest.fixture
def mixer():
    config = tiny_config(text_config={"n_groups": 2, "chunk_size": 4})  # several chunks and groups
    m = OmniMambaMixer(config.text_config, 0, rank=3, alpha=6, dropout=0.0).double()
    randomize(m)
    return m, config


@pytest.mark.parametrize("task", TASKS)
def test_chunked_sequence_equals_recurrence(mixer, task):
    m, _ = mixer
    u = torch.randn(2, 11, m.hidden_size, dtype=torch.float64)  # 11 = 2 full chunks of 4 + a partial one
    torch.testing.assert_close(m(u, task), reference_mixer(m, u, task), rtol=1e-10, atol=1e-10)


def test_prefill_then_steps_equals_recurrence(mixer):
    m, config = mixer
    u = torch.randn(2, 9, m.hidden_size, dtype=torch.float64)
    ref = reference_mixer(m, u, "t2i")
    cache = DynamicCache(config=config.text_config)
    outs = [m(u[:, :5], "t2i", cache)]
    for t in range(5, 9):
        outs.append(m(u[:, t : t + 1], "t2i", cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-10, atol=1e-10)
    # the recurrent state is the SSM state [batch, heads, head_dim, d_state]; the conv state the last K columns
    assert cache.layers[0].recurrent_states[0].shape == (2, m.num_heads, m.head_dim, m.ssm_state_size)
    assert cache.layers[0].conv_states[0].shape == (2, m.conv_dim, m.conv_kernel_size)


def test_short_prefill_and_multi_token_continuation(mixer):
    m, config = mixer
    u = torch.randn(1, 10, m.hidden_size, dtype=torch.float64)
    ref = reference_mixer(m, u, "mmu")
    cache = DynamicCache(config=config.text_config)
    # a prefill shorter than the conv kernel, then a step, then a multi-token chunk continuing the state
    outs = [m(u[:, :2], "mmu", cache), m(u[:, 2:3], "mmu", cache), m(u[:, 3:10], "mmu", cache)]
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-10, atol=1e-10)


def test_ssd_functions_directly():
    torch.manual_seed(1)
    b, l, h, p, g, n = 2, 13, 4, 3, 2, 5
    x = torch.randn(b, l, h, p, dtype=torch.float64)
    dt = torch.rand(b, l, h, dtype=torch.float64)
    A = -torch.rand(h, dtype=torch.float64) * 2
    B = torch.randn(b, l, g, n, dtype=torch.float64)
    C = torch.randn(b, l, g, n, dtype=torch.float64)
    init = torch.randn(b, h, p, n, dtype=torch.float64)
    y, final = ssd_chunked_scan(x, dt, A, B, C, chunk_size=5, initial_state=init)
    state, ys = init, []
    for t in range(l):
        yt, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(yt)
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, state, rtol=1e-10, atol=1e-10)


def test_padding_is_invisible(mixer):
    """Left padding (masked) gives the same outputs on the real positions as the unpadded sequence."""
    m, _ = mixer
    u = torch.randn(1, 7, m.hidden_size, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, m.hidden_size, dtype=torch.float64), u], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    torch.testing.assert_close(m(padded, "mmu", attention_mask=mask)[:, 3:], m(u, "mmu"), rtol=1e-10, atol=1e-10)


def test_task_adapter_only_changes_its_task(mixer):
    m, _ = mixer
    u = torch.randn(2, 6, m.hidden_size, dtype=torch.float64)
    before = {t: m(u, t) for t in TASKS}
    with torch.no_grad():
        m.in_proj.task_adapters["t2i"].up.weight.add_(1.0)
    assert torch.equal(m(u, "mmu"), before["mmu"])
    assert not torch.allclose(m(u, "t2i"), before["t2i"])
    # per-sample routing: row 0 mmu, row 1 t2i == the two single-task calls
    mixed = m(u, torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[0], m(u, "mmu")[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[1], m(u, "t2i")[1], rtol=1e-12, atol=1e-12)
