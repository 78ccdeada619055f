"""Vision transformer image encoder of BLIP.

Same module layout and parameter names as the original BLIP `models/vit.py` (itself timm's
ViT of 2021), so official checkpoints load unchanged: pre-norm blocks, LayerNorm eps 1e-6,
qkv with bias, exact GELU, a final norm, and the encoder returns every token (CLS first).

Differences from the original, none of which changes the numbers:
- attention runs through `F.scaled_dot_product_attention`; the explicit softmax path is kept
  for the original's attention-map capture (`register_blk` / `register_hook`, used for
  Grad-CAM style visualisation), which needs the probabilities as a tensor;
- activation checkpointing uses `torch.utils.checkpoint` (non-reentrant) on whole blocks
  instead of fairscale's wrapper, still only on the last `ckpt_layer` blocks.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an inspectable one."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True  # set False to always take the explicit softmax path
        self.attn_gradients = None
        self.attention_map = None

    # The original's visualisation hooks (names kept: notebooks call them).
    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        return self.attention_map

    def forward(self, x, register_hook=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)

        if self.fused_attn and not register_hook:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            if register_hook:
                self.save_attention_map(attn)
                if attn.requires_grad:
                    attn.register_hook(self.save_attn_gradients)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, register_hook=False):
        x = x + self.drop_path(self.attn(self.norm1(x), register_hook=register_hook))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2020) returning all tokens, as BLIP uses it.

    `use_grad_checkpointing` with `ckpt_layer=n` recomputes the activations of the last n blocks
    in the backward pass (the original's rule; n=0 checkpoints nothing).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, qk_scale=None, representation_size=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_layer=None,
                 use_grad_checkpointing=False, ckpt_layer=0):
        super().__init__()
        # num_classes and representation_size are accepted for signature compatibility: BLIP's
        # ViT has no classification head.
        self.num_features = self.embed_dim = embed_dim
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.grad_checkpointing = bool(use_grad_checkpointing)
        self.ckpt_layer = ckpt_layer

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True, ckpt_layer=None):
        """Turn activation checkpointing on or off (timm's name). `ckpt_layer=None` with
        `enable=True` checkpoints every block; an int checkpoints the last `ckpt_layer` blocks."""
        self.grad_checkpointing = bool(enable)
        if enable:
            self.ckpt_layer = len(self.blocks) if ckpt_layer is None else ckpt_layer

    def _is_checkpointed(self, i):
        return self.grad_checkpointing and i >= len(self.blocks) - self.ckpt_layer

    def forward(self, x, register_blk=-1):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        x = self.pos_drop(x)

        for i, blk in enumerate(self.blocks):
            register_hook = register_blk == i
            if self._is_checkpointed(i) and torch.is_grad_enabled() and not register_hook:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x, register_hook)
        return self.norm(x)


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a checkpoint's position embedding to `visual_encoder`'s patch grid.

    The extra (CLS) tokens are kept; the square grid of patch positions is resized with bicubic
    interpolation (align_corners=False). Returns the input unchanged when the grids agree.
    """
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint

    # float16/bfloat16 checkpoints are resized in float32 (bicubic in half precision is not
    # available everywhere, and the result goes into float32 parameters anyway)
    if pos_embed_checkpoint.dtype in (torch.float16, torch.bfloat16):
        pos_embed_checkpoint = pos_embed_checkpoint.float()
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    print('reshape position embedding from %d to %d' % (orig_size ** 2, new_size ** 2))
    return torch.cat((extra_tokens, pos_tokens), dim=1)
