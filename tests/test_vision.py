"""OmniMamba's fused DINOv2 + SigLIP vision encoder and its timm weight conversion (ORIGINAL-SPEC §2.1, §9, App. A).

The reference below is an independent pure-torch transcription of the timm ViT forward used by the original
(`get_intermediate_layers(n={depth - 2})`, no final norm), run on random timm-layout state dicts; the port converts the
same state dicts and must reproduce its features.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common import tiny_config
from omnimamba_hf.conversion.vision_towers import (
    convert_timm_dino_state_dict,
    convert_timm_siglip_state_dict,
)
from omnimamba_hf.modeling.configuration_omnimamba import OmniMambaVisionConfig
from omnimamba_hf.modeling.vision_omnimamba import OmniMambaVisionModel

# ---- random timm-layout state dicts (key table: spec Appendix A) ---------------------------------------------------


def _linear(sd, name, n_out, n_in, g):
    sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n_out, generator=g)


def _norm(sd, name, dim, g):
    sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)


def _blocks(sd, depth, dim, mlp, g, layerscale):
    for i in range(depth):
        b = f"blocks.{i}"
        _norm(sd, f"{b}.norm1", dim, g)
        _linear(sd, f"{b}.attn.qkv", 3 * dim, dim, g)
        _linear(sd, f"{b}.attn.proj", dim, dim, g)
        _norm(sd, f"{b}.norm2", dim, g)
        _linear(sd, f"{b}.mlp.fc1", mlp, dim, g)
        _linear(sd, f"{b}.mlp.fc2", dim, mlp, g)
        if layerscale:
            sd[f"{b}.ls1.gamma"] = 0.5 + torch.rand(dim, generator=g)
            sd[f"{b}.ls2.gamma"] = 0.5 + torch.rand(dim, generator=g)


def timm_dino_sd(c, grid=None, seed=0):
    """`vit_large_patch14_reg4_dinov2`-style keys; `grid` = side of the pos table (the config grid by default)."""
    g, dim = torch.Generator().manual_seed(seed), c.hidden_size
    grid = grid or c.image_size // c.patch_size
    sd = {
        "cls_token": 0.5 * torch.randn(1, 1, dim, generator=g),
        "reg_token": 0.5 * torch.randn(1, c.num_register_tokens, dim, generator=g),
        "pos_embed": 0.5 * torch.randn(1, grid * grid, dim, generator=g),
    }
    _linear(sd, "patch_embed.proj", dim, 3 * c.patch_size**2, g)
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(dim, 3, c.patch_size, c.patch_size)
    _blocks(sd, c.num_hidden_layers, dim, int(dim * c.mlp_ratio), g, layerscale=True)
    _norm(sd, "norm", dim, g)
    return sd


def timm_siglip_sd(c, seed=1):
    """`vit_so400m_patch14_siglip_384`-style keys, including the unused `attn_pool` head."""
    g, dim = torch.Generator().manual_seed(seed), c.hidden_size
    grid = c.image_size // c.patch_size
    sd = {"pos_embed": 0.5 * torch.randn(1, grid * grid, dim, generator=g)}
    _linear(sd, "patch_embed.proj", dim, 3 * c.patch_size**2, g)
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(dim, 3, c.patch_size, c.patch_size)
    _blocks(sd, c.num_hidden_layers, dim, c.intermediate_size, g, layerscale=False)
    _norm(sd, "norm", dim, g)
    sd["attn_pool.latent"] = torch.randn(1, 1, dim, generator=g)
    _linear(sd, "attn_pool.q", dim, dim, g)
    _linear(sd, "attn_pool.kv", 2 * dim, dim, g)
    _linear(sd, "attn_pool.proj", dim, dim, g)
    _norm(sd, "attn_pool.norm", dim, g)
    _linear(sd, "attn_pool.mlp.fc1", c.intermediate_size, dim, g)
    _linear(sd, "attn_pool.mlp.fc2", dim, c.intermediate_size, g)
    return sd


# ---- independent reference of the timm forward (spec §2.1) --------------------------------------------------------


def _mha(q, k, v, heads):
    """softmax(q kᵀ / √d) v over `heads` heads; q: [B, M, C], k/v: [B, N, C]."""
    B, M, C = q.shape
    d = C // heads
    q, k, v = (t.reshape(B, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, M, C)


def ref_timm_features(sd, x, *, heads, take_block, prefix=(), pos=None):
    """timm ViT up to block `take_block` (inclusive), pre-LN eps 1e-6, exact GELU, optional LayerScale; patch tokens
    get the position table BEFORE the prefix tokens (`prefix`: tensors [1, n, C]) are prepended; prefix dropped."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + (sd["pos_embed"] if pos is None else pos)
    x = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1)
    C = x.shape[-1]
    ln = lambda t, n: F.layer_norm(t, (C,), sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)  # noqa: E731
    lin = lambda t, n: F.linear(t, sd[f"{n}.weight"], sd[f"{n}.bias"])  # noqa: E731
    for i in range(take_block + 1):
        b = f"blocks.{i}"
        q, k, v = lin(ln(x, f"{b}.norm1"), f"{b}.attn.qkv").split(C, dim=-1)
        a = lin(_mha(q, k, v, heads), f"{b}.attn.proj")
        x = x + a * sd.get(f"{b}.ls1.gamma", 1.0)
        m = lin(F.gelu(lin(ln(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        x = x + m * sd.get(f"{b}.ls2.gamma", 1.0)
    return x[:, sum(p.shape[1] for p in prefix) :]


def ref_dino(sd, c, x, pos=None):
    return ref_timm_features(
        sd, x, heads=c.num_attention_heads, take_block=c.num_hidden_layers - 2,
        prefix=(sd["cls_token"], sd["reg_token"]), pos=pos,
    )  # fmt: skip


def ref_siglip(sd, c, x):
    return ref_timm_features(sd, x, heads=c.num_attention_heads, take_block=c.num_hidden_layers - 2)


def ref_attn_pool(sd, x, heads):
    """timm `AttentionPoolLatent` (latent_len 1, exact GELU MLP), pooled token."""
    C = x.shape[-1]
    p = "attn_pool"
    lin = lambda t, n: F.linear(t, sd[f"{n}.weight"], sd[f"{n}.bias"])  # noqa: E731
    q = lin(sd[f"{p}.latent"].expand(x.shape[0], -1, -1), f"{p}.q")
    k, v = lin(x, f"{p}.kv").split(C, dim=-1)
    y = lin(_mha(q, k, v, heads), f"{p}.proj")
    h = F.layer_norm(y, (C,), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], eps=1e-6)
    y = y + lin(F.gelu(lin(h, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return y[:, 0]


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vcfg():
    return tiny_config().vision_config


@pytest.fixture(scope="module")
def timm_sds(vcfg):
    return timm_dino_sd(vcfg.dino_config), timm_siglip_sd(vcfg.siglip_config)


def _converted_model(vcfg, dino_sd, siglip_sd):
    model = OmniMambaVisionModel(vcfg).eval()
    sd = {**convert_timm_dino_state_dict(dino_sd, vcfg), **convert_timm_siglip_state_dict(siglip_sd, vcfg)}
    model.load_state_dict(sd, strict=True)
    return model


def _pixels(vcfg, batch=2, seed=3):
    s = vcfg.image_size
    return torch.randn(batch, 2, 3, s, s, generator=torch.Generator().manual_seed(seed))


# ---- features ------------------------------------------------------------------------------------------------------


def test_features_match_timm_reference(vcfg, timm_sds):
    dino_sd, siglip_sd = timm_sds
    model = _converted_model(vcfg, dino_sd, siglip_sd)
    pixels = _pixels(vcfg)
    with torch.no_grad():
        out = model(pixels)
        want = torch.cat(
            [ref_dino(dino_sd, vcfg.dino_config, pixels[:, 0]), ref_siglip(siglip_sd, vcfg.siglip_config, pixels[:, 1])],
            dim=-1,
        )
    assert out.shape == (2, vcfg.num_patches, vcfg.hidden_size) == want.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the two images of the batch differ, and each tower sees only its own normalisation slot
    assert not torch.allclose(out[0], out[1])
    swapped = pixels.clone()
    swapped[:, 1] = torch.randn_like(swapped[:, 1])
    with torch.no_grad():
        out2 = model(swapped)
    d = vcfg.dino_config.hidden_size
    torch.testing.assert_close(out2[..., :d], out[..., :d], atol=0, rtol=0)
    assert not torch.allclose(out2[..., d:], out[..., d:])


def test_features_equal_hf_hidden_states_and_skip_last_block(vcfg, timm_sds):
    """Cross-check with the towers' own full forward (spec §9 #2: block k's output = hidden_states[k + 1], pre-norm);
    the blocks after the taken one must not run (poisoning them changes nothing)."""
    model = _converted_model(vcfg, *timm_sds)
    pixels = _pixels(vcfg)
    dc, sc = vcfg.dino_config, vcfg.siglip_config
    with torch.no_grad():
        out = model(pixels)
        dino_hs = model.dino(pixels[:, 0], output_hidden_states=True).hidden_states
        siglip_hs = model.siglip(pixels[:, 1], output_hidden_states=True).hidden_states
        want = torch.cat([dino_hs[dc.num_hidden_layers - 1][:, 1 + dc.num_register_tokens :], siglip_hs[-2]], dim=-1)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
        for layer in (model.dino.encoder.layer[-1], model.siglip.encoder.layers[-1]):
            for p in layer.parameters():
                p.fill_(float("nan"))
        model.dino.layernorm.weight.fill_(float("nan"))
        model.siglip.post_layernorm.weight.fill_(float("nan"))
        torch.testing.assert_close(model(pixels), out, atol=0, rtol=0)


def test_dino_pos_table_used_without_runtime_interpolation(vcfg, timm_sds):
    model = _converted_model(vcfg, *timm_sds)
    emb = model.dino.embeddings
    s = vcfg.image_size
    tokens = torch.zeros(1, 1 + vcfg.num_patches, vcfg.dino_config.hidden_size)
    assert emb.interpolate_pos_encoding(tokens, s, s) is emb.position_embeddings
    # class row is zero (timm folded the class position into cls_token); registers carry no position
    assert torch.count_nonzero(emb.position_embeddings[:, 0]) == 0
    torch.testing.assert_close(emb.cls_token, timm_sds[0]["cls_token"], atol=0, rtol=0)


def test_dino_pos_embed_resampled_like_timm(vcfg, timm_sds):
    """A larger (37×37-style) source table is resampled once, as timm's `resample_abs_pos_embed` at load time."""
    c = vcfg.dino_config
    grid = c.image_size // c.patch_size
    big = timm_dino_sd(c, grid=5, seed=7)
    table = big["pos_embed"].reshape(1, 5, 5, c.hidden_size).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, grid * grid, c.hidden_size)
    conv = convert_timm_dino_state_dict(big, vcfg)
    pos = conv["dino.embeddings.position_embeddings"]
    torch.testing.assert_close(pos[:, 1:], want, atol=0, rtol=0)
    assert torch.count_nonzero(pos[:, 0]) == 0
    model = _converted_model(vcfg, big, timm_sds[1])
    pixels = _pixels(vcfg, seed=11)
    with torch.no_grad():
        got = model(pixels)[..., : c.hidden_size]
        torch.testing.assert_close(got, ref_dino(big, c, pixels[:, 0], pos=want), atol=1e-5, rtol=1e-5)
    # a reduced-precision source stays in its dtype (resampled in float32, cast back, as timm)
    half = convert_timm_dino_state_dict({k: v.to(torch.bfloat16) for k, v in big.items()}, vcfg)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    torch.testing.assert_close(
        half["dino.embeddings.position_embeddings"][:, 1:].float(), want, atol=2e-2, rtol=2e-2
    )


def test_siglip_attention_pool_head_mapping(vcfg, timm_sds):
    """The unused `attn_pool` maps onto HF's `head` with q‖kv → in_proj in (q, k, v) order."""
    model = _converted_model(vcfg, *timm_sds)
    x = torch.randn(2, vcfg.num_patches, vcfg.siglip_config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.siglip.head(x)
    want = ref_attn_pool(timm_sds[1], x, vcfg.siglip_config.num_attention_heads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_eager_sdpa_and_bf16(vcfg, timm_sds):
    model = _converted_model(vcfg, *timm_sds)
    pixels = _pixels(vcfg)
    assert model.dino.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref = model(pixels)
        model.dino.set_attn_implementation("eager")
        model.siglip.set_attn_implementation("eager")
        torch.testing.assert_close(model(pixels), ref, atol=1e-5, rtol=1e-5)
        model.to(torch.bfloat16)
        out = model(pixels)  # fp32 pixels are cast to the towers' dtype inside the patch embeddings
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
        out = model(pixels.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 28, 28), (2, 1, 3, 28, 28), (2, 3, 2, 28, 28), (2, 2, 1, 28, 28), (2, 2, 3, 32, 32), (2, 2, 3, 28, 14)],
)
def test_pixel_shape_errors(vcfg, shape):
    model = OmniMambaVisionModel(vcfg)
    with pytest.raises(ValueError, match=r"\(batch, 2, 3, 28, 28\)") as err:
        model(torch.zeros(shape))
    assert "OmniMambaImageProcessor" in str(err.value) and str(tuple(shape)) in str(err.value)


def test_pixel_dtype_error(vcfg):
    with pytest.raises(ValueError, match="normalised floats"):
        OmniMambaVisionModel(vcfg)(torch.zeros(1, 2, 3, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize("tower", ["dino", "siglip"])
def test_conversion_key_errors(vcfg, timm_sds, tower):
    sd = dict(timm_sds[0] if tower == "dino" else timm_sds[1])
    convert = convert_timm_dino_state_dict if tower == "dino" else convert_timm_siglip_state_dict
    missing = dict(sd)
    del missing["blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn.qkv.bias'\]"):
        convert(missing, vcfg)
    extra = {**sd, "head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        convert(extra, vcfg)
    prefixed = {f"visual.trunk.{k}": v for k, v in sd.items()}  # prefixes must be stripped by the caller
    with pytest.raises(ValueError, match="unexpected keys"):
        convert(prefixed, vcfg)
    # a key from the last block only: a depth mismatch with the config is reported as unexpected
    deeper = {**sd, f"blocks.{vcfg.dino_config.num_hidden_layers + 5}.norm1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys"):
        convert(deeper, vcfg)


@pytest.mark.parametrize(
    "tower, key, shape",
    [
        ("dino", "blocks.0.attn.qkv.weight", (51, 16)),
        ("dino", "blocks.2.ls2.gamma", (15,)),
        ("dino", "reg_token", (1, 3, 16)),
        ("dino", "pos_embed", (1, 5, 16)),  # not a square grid
        ("siglip", "blocks.0.mlp.fc1.weight", (41, 24)),
        ("siglip", "pos_embed", (1, 9, 24)),  # SigLIP's table is never resampled
        ("siglip", "attn_pool.kv.weight", (24, 24)),
    ],
)
def test_conversion_shape_errors(vcfg, timm_sds, tower, key, shape):
    sd = dict(timm_sds[0] if tower == "dino" else timm_sds[1])
    convert = convert_timm_dino_state_dict if tower == "dino" else convert_timm_siglip_state_dict
    sd[key] = torch.zeros(shape)
    with pytest.raises(ValueError, match="mis-shaped") as err:
        convert(sd, vcfg)
    assert key in str(err.value)


def test_converted_keys_cover_model_exactly(vcfg, timm_sds):
    dino = convert_timm_dino_state_dict(timm_sds[0], vcfg)
    siglip = convert_timm_siglip_state_dict(timm_sds[1], vcfg)
    model_keys = set(OmniMambaVisionModel(vcfg).state_dict())
    assert set(dino) | set(siglip) == model_keys and not set(dino) & set(siglip)
    assert all(k.startswith("dino.") for k in dino) and all(k.startswith("siglip.") for k in siglip)


# ---- full size (meta device) ---------------------------------------------------------------------------------------

SPEC_DINO_PARAMS = 303_715_328  # spec §1.7 (timm vit_large_patch14_reg4_dinov2 @ 384)
SPEC_SIGLIP_PARAMS = 428_225_600  # spec §1.7 (timm vit_so400m_patch14_siglip_384, incl. attn_pool and norm)


def test_full_size_parameter_counts_and_conversion_on_meta():
    config = OmniMambaVisionConfig()
    assert config.siglip_config.hidden_act == "gelu" and config.dino_config.hidden_act == "gelu"  # exact GELU (§9 #2)
    assert (config.num_patches, config.hidden_size) == (729, 2176)
    with torch.device("meta"):
        model = OmniMambaVisionModel(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dino, siglip = count(model.dino), count(model.siglip)
    # HF-only DINOv2 tensors without a timm counterpart: mask_token [1, 1024] and the class row of the position table
    hf_only = model.dino.embeddings.mask_token.numel() + model.dino.embeddings.position_embeddings[:, 0].numel()
    print(f"\nDINOv2 params: {dino:,} (= spec {SPEC_DINO_PARAMS:,} + {hf_only:,} HF-only: mask_token + class pos row)")
    print(f"SigLIP params: {siglip:,} (spec {SPEC_SIGLIP_PARAMS:,})")
    assert hf_only == 2048
    assert dino - hf_only == SPEC_DINO_PARAMS
    assert siglip == SPEC_SIGLIP_PARAMS
    assert model.dino.embeddings.position_embeddings.shape == (1, 730, 1024)
    assert model.siglip.embeddings.position_embedding.weight.shape == (729, 1152)

    # the released timm key/shape layout (spec App. A; DINOv2 pos table at its native 37×37) converts onto it exactly
    with torch.device("meta"):
        dsd = timm_dino_sd(config.dino_config, grid=37)
        ssd = timm_siglip_sd(config.siglip_config)
    assert (len(dsd), len(ssd)) == (343, 342)  # spec §1.2 entry totals
    assert dsd["pos_embed"].shape == (1, 1369, 1024) and dsd["blocks.0.attn.qkv.weight"].shape == (3072, 1024)
    assert ssd["attn_pool.kv.weight"].shape == (2304, 1152) and ssd["blocks.0.mlp.fc1.weight"].shape == (4304, 1152)
    converted = {**convert_timm_dino_state_dict(dsd, config), **convert_timm_siglip_state_dict(ssd, config)}
    model.load_state_dict(converted, strict=True, assign=True)
