import torch
import torch.nn as nn
import torch.nn.functional as F

_CFGS = {
    "vit_large_patch14_reg4_dinov2": (
        dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4, no_embed_class=True),
        dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0),
    ),
    "vit_so400m_patch14_siglip_384": (
        dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, global_pool="map"),
        dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
    ),
}


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _AttnPool(nn.Module):  # timm AttentionPoolLatent (unused by OmniMamba, present for the key table)
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))


class _PatchEmbed(nn.Module):
    def __init__(self, img_size, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.num_patches = (img_size // patch) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 init_values=None, class_token=True, reg_tokens=0, no_embed_class=False, global_pool="token",
                 num_classes=1000, **kwargs):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.patch_embed = _PatchEmbed(img_size, patch_size, embed_dim)
        n = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = _AttnPool(embed_dim, num_heads, mlp_ratio) if global_pool == "map" else None
        self.pretrained_cfg = {}

    def _pos_embed(self, x):
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            return torch.cat(prefix + [x + self.pos_embed], 1)
        return torch.cat(prefix + [x], 1) + self.pos_embed

    def get_intermediate_layers(self, x, n=1, reshape=False, return_prefix_tokens=False, norm=False, **kwargs):
        take = set(range(len(self.blocks) - n, len(self.blocks))) if isinstance(n, int) else set(n)
        x = self._pos_embed(self.patch_embed(x))
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outs.append((self.norm(x) if norm else x)[:, self.num_prefix_tokens :])
        return outs  # a list, as timm >= 1.0


def create_model(name, pretrained=False, num_classes=1000, img_size=224, **kwargs):
    base = name.split(".")[0]
    if pretrained:
        raise RuntimeError("cpu stub: no pretrained weights")
    args, data_cfg = _CFGS[base]
    model = VisionTransformer(img_size=img_size, num_classes=num_classes, **dict(args, **kwargs))
    model.pretrained_cfg = dict(data_cfg, input_size=(3, img_size, img_size), interpolation="bicubic")
    return model
