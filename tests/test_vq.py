"""OmniMambaVQVAE (LlamaGen VQ-16 on JanusVQVAE) and the LlamaGen checkpoint conversion.

The oracle is an independent, functional pure-torch LlamaGen VQ written from ORIGINAL-SPEC §6.1/§6.2 that reads a
LlamaGen-layout state dict (Appendix B key names) directly. A random tiny checkpoint in that layout is converted,
loaded strictly into `OmniMambaVQVAE`, and both sides are compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import tiny_config
from transformers import JanusVQVAE, JanusVQVAEConfig, PreTrainedModel
from transformers.testing_utils import slow

from omnimamba_hf.conversion.vq_llamagen import convert_llamagen_vq_state_dict, unwrap_llamagen_checkpoint
from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaVQVAEConfig
from omnimamba_hf.modeling.vq_omnimamba import OmniMambaVQVAE

LLAMAGEN_VQ16_PARAMS = 71_883_403  # §1.7, without the 65,536-element `codebook_used` buffer


# ---- LlamaGen reference (spec §6.1, §6.2; LlamaGen key names) --------------------------------------------------------


def llamagen_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Key → shape of a LlamaGen VQModel state dict (Appendix B templates), incl. `quantize.codebook_used`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(p, o, i, k):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def res(p, i, o):
        norm(f"{p}.norm1", i), conv(f"{p}.conv1", o, i, 3), norm(f"{p}.norm2", o), conv(f"{p}.conv2", o, o, 3)
        if i != o:
            conv(f"{p}.nin_shortcut", o, i, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    def mid(p, c):
        res(f"{p}.mid.0", c, c), attn(f"{p}.mid.1", c), res(f"{p}.mid.2", c, c)

    ch, mult, nrb, z = cfg.base_channels, list(cfg.channel_multiplier), cfg.num_res_blocks, cfg.latent_channels
    levels = len(mult)
    conv("encoder.conv_in", ch, cfg.in_channels, 3)
    c_in = ch
    for lvl in range(levels):
        for j in range(nrb):
            res(f"encoder.conv_blocks.{lvl}.res.{j}", c_in, ch * mult[lvl])
            c_in = ch * mult[lvl]
            if lvl == levels - 1:
                attn(f"encoder.conv_blocks.{lvl}.attn.{j}", c_in)
        if lvl != levels - 1:
            conv(f"encoder.conv_blocks.{lvl}.downsample.conv", c_in, c_in, 3)
    mid("encoder", c_in)
    norm("encoder.norm_out", c_in)
    conv("encoder.conv_out", z, c_in, 3)

    c_in = ch * mult[-1]
    conv("decoder.conv_in", c_in, z, 3)
    mid("decoder", c_in)
    for i, lvl in enumerate(reversed(range(levels))):  # conv_blocks[0] = lowest resolution
        for j in range(nrb + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", c_in, ch * mult[lvl])
            c_in = ch * mult[lvl]
            if lvl == levels - 1:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", c_in)
        if lvl != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", c_in, c_in, 3)
    norm("decoder.norm_out", c_in)
    conv("decoder.conv_out", cfg.out_channels, c_in, 3)

    shapes["quantize.codebook_used"] = (65536,)
    shapes["quantize.embedding.weight"] = (cfg.num_embeddings, cfg.embed_dim)
    conv("quant_conv", cfg.embed_dim, z, 1)
    conv("post_quant_conv", z, cfg.embed_dim, 1)
    return shapes


def random_llamagen_state_dict(cfg, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in llamagen_shapes(cfg).items():
        if key == "quantize.codebook_used":
            sd[key] = torch.zeros(shape)
        elif key == "quantize.embedding.weight":
            # rows of very different norms, so that un-normalised (Janus) and normalised (LlamaGen) argmin disagree
            scale = torch.exp(torch.empty(shape[0], 1).uniform_(-2.0, 2.0, generator=g))
            sd[key] = torch.randn(shape, generator=g) * scale
        elif len(shape) == 4:
            sd[key] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif ".norm" in key and key.endswith(".weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def _gn(sd, p, x):  # Normalize: GroupNorm(32, eps 1e-6, affine)
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=0):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, p, x):
    h = _conv(sd, f"{p}.conv1", _swish(_gn(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", _swish(_gn(sd, f"{p}.norm2", h)), padding=1)  # dropout(0) omitted
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{p}.nin_shortcut", x)
    return x + h


def _attn(sd, p, x):  # single head over h*w positions, scale c^-1/2, softmax over keys
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h) for n in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
    w = F.softmax(w, dim=2)
    h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", h)


def _block_level(sd, p, x, n_blocks):
    for j in range(n_blocks):
        x = _res(sd, f"{p}.res.{j}", x)
        if f"{p}.attn.{j}.q.weight" in sd:
            x = _attn(sd, f"{p}.attn.{j}", x)
    return x


def _mid(sd, p, x):
    return _res(sd, f"{p}.mid.2", _attn(sd, f"{p}.mid.1", _res(sd, f"{p}.mid.0", x)))


def ref_encode(sd, cfg, x):
    """LlamaGen `VQModel.encode` → (z_q value, flat ids (B, h*w))."""
    levels = len(cfg.channel_multiplier)
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for lvl in range(levels):
        h = _block_level(sd, f"encoder.conv_blocks.{lvl}", h, cfg.num_res_blocks)
        if lvl != levels - 1:  # Downsample: pad right/bottom by 1, 3x3 conv stride 2, no padding
            h = _conv(sd, f"encoder.conv_blocks.{lvl}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", _mid(sd, "encoder", h))), padding=1)
    h = _conv(sd, "quant_conv", h)
    # VectorQuantizer with l2_norm: normalise latent and codebook, ||z||^2 + ||e||^2 - 2 z.e, first argmin
    z = F.normalize(h.permute(0, 2, 3, 1).contiguous(), p=2, dim=-1)
    zf = z.reshape(-1, z.shape[-1])
    e = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    d = torch.sum(zf**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
    idx = torch.argmin(d, dim=1)
    return e[idx].view(z.shape).permute(0, 3, 1, 2), idx.view(x.shape[0], -1)


def ref_decode_code(sd, cfg, codes):
    """LlamaGen `decode_code(codes, shape=[B, C, grid, grid])`."""
    g, levels = cfg.num_patches, len(cfg.channel_multiplier)
    e = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    z = e[codes.reshape(-1)].reshape(codes.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous()
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z), padding=1)
    h = _mid(sd, "decoder", h)
    for i in range(levels):
        h = _block_level(sd, f"decoder.conv_blocks.{i}", h, cfg.num_res_blocks + 1)
        if i != levels - 1:  # Upsample: nearest x2, 3x3 conv pad 1
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv(sd, f"decoder.conv_blocks.{i}.upsample.conv", h, padding=1)
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)), padding=1)


# ---- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return tiny_config().vq_config  # embed 4, 64 codes, latent 16, base 32, mult [1, 2], 1 res block, 4x4 grid, 8 px


@pytest.fixture(scope="module")
def llamagen_sd(cfg):
    return random_llamagen_state_dict(cfg)


@pytest.fixture(scope="module")
def model(cfg, llamagen_sd):
    vq = OmniMambaVQVAE(cfg)
    vq.load_state_dict(convert_llamagen_vq_state_dict(llamagen_sd, cfg), strict=True)
    return vq


def _images(cfg, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


# ---- numerics vs the reference ---------------------------------------------------------------------------------------


def test_decode_matches_llamagen(model, cfg, llamagen_sd):
    codes = torch.randint(0, cfg.num_embeddings, (3, cfg.num_patches**2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref = model.decode_codes(codes), ref_decode_code(llamagen_sd, cfg, codes)
    assert ours.shape == (3, 3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_encode_matches_llamagen_exactly(model, cfg, llamagen_sd):
    x = _images(cfg)
    with torch.no_grad():
        z_q_ref, codes_ref = ref_encode(llamagen_sd, cfg, x)
        codes = model.encode_to_codes(x)
        z_q = model.encode(x).quantized_last_hidden_state
    assert codes.dtype == torch.long and codes.shape == (8, cfg.num_patches**2)
    assert len(codes_ref.unique()) > 8  # a non-degenerate test
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(z_q, z_q_ref, atol=1e-6, rtol=0)  # value = L2-normalised code


def test_janus_unnormalised_quantisation_differs(cfg, llamagen_sd):
    """Guards the test above: plain JanusVQVAE (same weights) quantises differently, so encode can fail."""
    fields = ("embed_dim", "num_embeddings", "latent_channels", "base_channels", "channel_multiplier")
    fields += ("num_res_blocks", "num_patches")
    janus = JanusVQVAE(JanusVQVAEConfig(**{k: getattr(cfg, k) for k in fields}))
    janus.load_state_dict(convert_llamagen_vq_state_dict(llamagen_sd, cfg), strict=True)
    x = _images(cfg)
    with torch.no_grad():
        janus_codes = janus.encode(x).image_tokens.view(x.shape[0], -1)
        _, codes_ref = ref_encode(llamagen_sd, cfg, x)
    assert not torch.equal(janus_codes, codes_ref)


def test_roundtrip_forward_shapes(model, cfg):
    x = _images(cfg, n=2)
    with torch.no_grad():
        out = model(x)
    assert out.decoded_pixel_values.shape == x.shape
    torch.testing.assert_close(out.decoded_pixel_values, model.decode_codes(model.encode_to_codes(x)))


def test_forward_trains_the_encoder_like_llamagen(cfg, llamagen_sd):
    """`forward` is LlamaGen's `VQModel.forward`: the reconstruction decodes the straight-through latent, so its loss
    has a gradient on the encoder and `quant_conv` (Janus' forward, decoding the argmin ids, gives them none)."""
    vq = OmniMambaVQVAE(cfg)
    vq.load_state_dict(convert_llamagen_vq_state_dict(llamagen_sd, cfg), strict=True)
    x = _images(cfg, n=2)
    out = vq(x)
    out.decoded_pixel_values.square().mean().backward()
    for module in (vq.encoder, vq.quant_conv, vq.post_quant_conv, vq.decoder):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, module
    vq.zero_grad()
    JanusVQVAE.forward(vq, x).decoded_pixel_values.square().mean().backward()  # the control: no encoder gradient
    assert all(p.grad is None for p in vq.encoder.parameters())
    z_q_ref, codes_ref = ref_encode(llamagen_sd, cfg, x)
    with torch.no_grad():
        torch.testing.assert_close(out.decoded_pixel_values, ref_decode_code(llamagen_sd, cfg, codes_ref), atol=1e-5, rtol=0)
        z = F.normalize(vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1), dim=-1)
        # LlamaGen: codebook loss + β · commitment loss, both the MSE between the normalised latent and its code
        expected = (1 + vq.quantize.beta) * torch.mean((z_q_ref.permute(0, 2, 3, 1) - z) ** 2)
    torch.testing.assert_close(out.embedding_loss.detach(), expected, atol=1e-6, rtol=1e-5)


# ---- input validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, match",
    [
        (lambda n, g: torch.full((2, g * g), n), r"\[0, 64\)"),
        (lambda n, g: torch.full((2, g * g), -1), r"\[0, 64\)"),
        (lambda n, g: torch.zeros(2, g * g - 1, dtype=torch.long), r"shape \(batch, 16\)"),
        (lambda n, g: torch.zeros(2, g, g, dtype=torch.long), r"shape \(batch, 16\)"),
        (lambda n, g: torch.zeros(2, g * g), "integer tensor"),
    ],
)
def test_decode_codes_rejects_bad_codes(model, cfg, codes, match):
    with pytest.raises(ValueError, match=match):
        model.decode_codes(codes(cfg.num_embeddings, cfg.num_patches))


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((2, 3, 16, 16), torch.float32, "image_size=8"),
        ((2, 1, 8, 8), torch.float32, "image_size=8"),
        ((3, 8, 8), torch.float32, "floating-point tensor of shape"),
        ((2, 3, 8, 8), torch.long, "floating-point tensor of shape"),
    ],
)
def test_encode_to_codes_and_forward_reject_bad_pixels(model, shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        model.encode_to_codes(torch.zeros(shape, dtype=dtype))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape, dtype=dtype))


def test_inconsistent_config_rejected(cfg):
    with pytest.raises(ValueError, match="num_patches"):
        OmniMambaVQVAE(OmniMambaVQVAEConfig(**{**cfg.to_diff_dict(), "num_patches": 2}))
    with pytest.raises(ValueError, match="divisible by 32"):
        OmniMambaVQVAE(OmniMambaVQVAEConfig(**{**cfg.to_diff_dict(), "base_channels": 16}))


# ---- conversion ------------------------------------------------------------------------------------------------------


def test_conversion_strict_and_complete(cfg, llamagen_sd):
    out = convert_llamagen_vq_state_dict(llamagen_sd, cfg)
    target = OmniMambaVQVAE(cfg).state_dict()
    assert list(out) == list(target)
    assert "quantize.codebook_used" not in out
    assert out["encoder.mid.attn_1.q.weight"] is llamagen_sd["encoder.mid.1.q.weight"]
    assert out["decoder.up.0.attn.1.proj_out.bias"] is llamagen_sd["decoder.conv_blocks.0.attn.1.proj_out.bias"]
    assert out["encoder.down.0.downsample.conv.weight"] is llamagen_sd["encoder.conv_blocks.0.downsample.conv.weight"]
    # the usage buffer is optional (LlamaGen's own vq_ckpt path pops it)
    without = {k: v for k, v in llamagen_sd.items() if k != "quantize.codebook_used"}
    assert list(convert_llamagen_vq_state_dict(without, cfg)) == list(target)


def test_conversion_errors_name_keys(cfg, llamagen_sd):
    missing = {k: v for k, v in llamagen_sd.items() if k != "encoder.conv_blocks.0.res.0.conv1.weight"}
    with pytest.raises(ValueError, match=r"not produced.*encoder\.down\.0\.block\.0\.conv1\.weight"):
        convert_llamagen_vq_state_dict(missing, cfg)
    extra = {**llamagen_sd, "encoder.conv_blocks.0.res.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.conv_blocks\.0\.res\.0\.extra\.weight"):
        convert_llamagen_vq_state_dict(extra, cfg)
    bad = {**llamagen_sd, "quant_conv.weight": torch.zeros(1, 2, 3, 4)}
    with pytest.raises(ValueError, match=r"shape mismatches: quant_conv\.weight -> quant_conv\.weight"):
        convert_llamagen_vq_state_dict(bad, cfg)
    dup = {**llamagen_sd, "encoder.mid.block_1.norm1.weight": llamagen_sd["encoder.mid.0.norm1.weight"]}
    with pytest.raises(ValueError, match=r"more than once.*encoder\.mid\.block_1\.norm1\.weight"):
        convert_llamagen_vq_state_dict(dup, cfg)


def test_unwrap_llamagen_checkpoint(llamagen_sd):
    assert unwrap_llamagen_checkpoint({"model": llamagen_sd, "optimizer": {}, "steps": 3}) == llamagen_sd
    assert unwrap_llamagen_checkpoint(llamagen_sd) == llamagen_sd
    with pytest.raises(ValueError, match="Not a LlamaGen VQ checkpoint"):
        unwrap_llamagen_checkpoint({"steps": 3})


def test_full_size_layout_and_parameter_count():
    cfg = OmniMambaVQVAEConfig()
    with torch.device("meta"):
        vq = OmniMambaVQVAE(cfg)
    n = sum(p.numel() for p in vq.parameters())
    print(f"OmniMambaVQVAE default config: {n:,} parameters")
    assert n == LLAMAGEN_VQ16_PARAMS
    assert sum(p.numel() for p in vq.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in vq.decoder.parameters()) == 42_449_795
    assert list(vq.buffers()) == []
    # Appendix B: 344 LlamaGen entries (incl. the buffer), which convert one-to-one onto the 343 module keys
    shapes = llamagen_shapes(cfg)
    assert len(shapes) == 344 and sum(1 for k in shapes if k.startswith("encoder.")) == 144
    assert sum(1 for k in shapes if k.startswith("decoder.")) == 194
    meta_sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert len(convert_llamagen_vq_state_dict(meta_sd, cfg)) == 343


@slow
def test_full_size_numerics_match_llamagen():
    """The released geometry (256 px, 16x16 grid, 16384 codes) with random weights; about a minute on CPU."""
    cfg = OmniMambaVQVAEConfig()
    sd = random_llamagen_state_dict(cfg)
    vq = OmniMambaVQVAE(cfg)
    vq.load_state_dict(convert_llamagen_vq_state_dict(unwrap_llamagen_checkpoint({"model": sd}), cfg), strict=True)
    codes = torch.randint(0, cfg.num_embeddings, (1, 256), generator=torch.Generator().manual_seed(4))
    x = _images(cfg, n=2)
    with torch.no_grad():
        torch.testing.assert_close(vq.decode_codes(codes), ref_decode_code(sd, cfg, codes), atol=1e-5, rtol=0)
        assert torch.equal(vq.encode_to_codes(x), ref_encode(sd, cfg, x)[1])


# ---- init, eval mode, composition, save/load -------------------------------------------------------------------------


def test_fresh_init_eval_and_llamagen_codebook(cfg):
    vq = OmniMambaVQVAE(cfg)
    assert not any(m.training for m in vq.modules())
    assert all(torch.isfinite(p).all() for p in vq.parameters())
    torch.testing.assert_close(vq.quantize.embedding.weight.norm(dim=-1), torch.ones(cfg.num_embeddings))


class _Holder(PreTrainedModel):
    """A composite model holding the VQ as a sub-model, as OmniMambaModel does."""

    config_class = OmniMambaVQVAEConfig
    _supports_sdpa = True  # the shared config already carries the VQ's "sdpa" choice

    def __init__(self, config):
        super().__init__(config)
        self.vqmodel = OmniMambaVQVAE._from_config(config)
        self.post_init()


def test_composed_save_load_keeps_weights(tmp_path, cfg, llamagen_sd):
    holder = _Holder(cfg)
    holder.vqmodel.load_state_dict(convert_llamagen_vq_state_dict(llamagen_sd, cfg), strict=True)
    holder.save_pretrained(tmp_path / "holder")
    holder.vqmodel.save_pretrained(tmp_path / "vq")
    from_holder = _Holder.from_pretrained(tmp_path / "holder").vqmodel
    codes = torch.randint(0, cfg.num_embeddings, (2, cfg.num_patches**2), generator=torch.Generator().manual_seed(3))
    ref = ref_decode_code(llamagen_sd, cfg, codes)
    for loaded in (from_holder, OmniMambaVQVAE.from_pretrained(tmp_path / "vq")):
        # the loaded codebook (non-unit rows) must not be re-initialised/renormalised by _init_weights
        assert torch.equal(loaded.quantize.embedding.weight, llamagen_sd["quantize.embedding.weight"])
        with torch.no_grad():
            torch.testing.assert_close(loaded.decode_codes(codes), ref, atol=1e-5, rtol=0)
