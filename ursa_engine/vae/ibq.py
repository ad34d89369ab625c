"""URSA's image tokenizer: a 2D VQ autoencoder with an IBQ code table (``AutoencoderVQ``).

Facts reproduced from the authors' model (``diffnext/models/autoencoders/autoencoder_vq.py`` on
the ``Encoder`` / ``Decoder`` of ``autoencoder_kl.py``): an SD-style convolutional autoencoder
(group norms of 32 groups, eps 1e-6, SiLU; 3×3 convs; downsampling by a stride-2 conv after a
(0, 1, 0, 1) zero pad, upsampling by nearest ×2 then a conv; a single-head attention in each
mid block, and optionally after every resnet of the deepest encoder stage / first decoder stage
(``attn_down_block`` / ``attn_up_block``)); spatial stride ``2^(len(block_out_channels) − 1)``;
codes by the largest inner product with the (K, m) table (``quantizer.embedding.weight``). The
config's optional ``decoder_dtype`` runs the decoder (and its input) in that dtype. Frames are
independent: a (B, T, h, w) grid decodes as B·T images, in chunks of frames (no tiling: the
authors never tile this model spatially, and its attention sees the whole image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, attention_bytes, frame_chunks
from .quantizers import VQuantizer

DEFAULTS = {  # the authors' class defaults (a config.json overrides them)
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "num_vq_embeddings": 16384, "vq_embed_dim": 8, "attn_down_block": False,
    "attn_up_block": False, "temporal_stride": 1, "spatial_stride": 16, "decoder_dtype": None,
    "_quantizer_name": "VQuantizer",
}
GROUPS = 32


class Attention2d(nn.Module):
    """Single-head attention over the H·W positions; the caller adds the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(GROUPS, dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = (f(t)[:, None] for f in (self.to_q, self.to_k, self.to_v))
        o = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return o.transpose(1, 2).reshape(B, C, H, W)


class ResBlock2d(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, out_dim, 3, 1, 1)
        self.norm2 = nn.GroupNorm(GROUPS, out_dim, eps=1e-6)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        self.conv_shortcut = nn.Conv2d(dim, out_dim, 1) if out_dim != dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        return self.conv2(F.silu(self.norm2(h), inplace=True)).add_(shortcut)


class Resize2d(nn.Module):
    def __init__(self, dim: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(dim, dim, 3, 2, 0) if down else nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=(2, 2), mode="nearest"))


class Stage2d(nn.Module):
    """``resnets`` (each optionally followed by an attention with residual), then a resampler."""

    def __init__(self, dim: int, out_dim: int, depth: int, *, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock2d(dim if i == 0 else out_dim, out_dim) for i in range(depth))
        self.attentions = nn.ModuleList()
        if down:
            self.downsamplers = nn.ModuleList([Resize2d(out_dim, True)])
        if up:
            self.upsamplers = nn.ModuleList([Resize2d(out_dim, False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if i < len(self.attentions):
                x = self.attentions[i](x).add_(x)
        for resize in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = resize(x)
        return x


class MidBlock2d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock2d(dim, dim), ResBlock2d(dim, dim)])
        self.attentions = nn.ModuleList([Attention2d(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x).add_(x))


class Encoder2d(nn.Module):
    def __init__(self, dim: int, out_dim: int, block_dims, depth: int):
        super().__init__()
        self.conv_in = nn.Conv2d(dim, block_dims[0], 3, 1, 1)
        n = len(block_dims)
        self.down_blocks = nn.ModuleList(Stage2d(block_dims[max(i - 1, 0)], d, depth, down=i < n - 1)
                                         for i, d in enumerate(block_dims))
        self.mid_block = MidBlock2d(block_dims[-1])
        self.conv_norm_out = nn.GroupNorm(GROUPS, block_dims[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(block_dims[-1], out_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x)), inplace=True))


class Decoder2d(nn.Module):
    def __init__(self, dim: int, out_dim: int, block_dims, depth: int):
        super().__init__()
        rev = list(reversed(block_dims))
        n = len(rev)
        self.up_blocks = nn.ModuleList(Stage2d(rev[max(i - 1, 0)], d, depth + 1, up=i < n - 1)
                                       for i, d in enumerate(rev))
        self.conv_in = nn.Conv2d(dim, rev[0], 3, 1, 1)
        self.mid_block = MidBlock2d(rev[0])
        self.conv_norm_out = nn.GroupNorm(GROUPS, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_dim, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class IBQTokenizer(Tokenizer):
    """The image tokenizer of URSA's IBQ1024 / IBQ512 checkpoints (K = 131,072, m = 256, stride 16)."""

    class_name = "AutoencoderVQ"
    temporal_stride = 1

    def __init__(self, config: dict | None = None):
        cfg = {**DEFAULTS, **(config or {})}
        super().__init__(cfg)
        if cfg["_quantizer_name"] != "VQuantizer":
            raise ValueError(f"config: _quantizer_name {cfg['_quantizer_name']!r} is not supported (URSA's image "
                             "tokenizers use 'VQuantizer')")
        dims, depth = tuple(cfg["block_out_channels"]), int(cfg["layers_per_block"])
        self.in_channels, self.spatial_stride = int(cfg["in_channels"]), int(cfg["spatial_stride"])
        if 2 ** (len(dims) - 1) != self.spatial_stride or int(cfg["temporal_stride"]) != 1:
            raise ValueError(f"config: block_out_channels {dims} downsample by {2 ** (len(dims) - 1)} but "
                             f"spatial_stride={self.spatial_stride} (temporal_stride={cfg['temporal_stride']}, "
                             "expected 1)")
        self.encoder = Encoder2d(self.in_channels, cfg["latent_channels"], dims, depth)
        self.decoder = Decoder2d(cfg["latent_channels"], cfg["out_channels"], dims, depth)
        self.quant_conv = nn.Conv2d(cfg["latent_channels"], cfg["vq_embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(cfg["vq_embed_dim"], cfg["latent_channels"], 1)
        if cfg["attn_down_block"]:
            self.encoder.down_blocks[-1].attentions.extend(Attention2d(dims[-1]) for _ in range(depth))
        if cfg["attn_up_block"]:
            self.decoder.up_blocks[0].attentions.extend(Attention2d(dims[-1]) for _ in range(depth + 1))
        self.quantizer = VQuantizer(cfg["num_vq_embeddings"], cfg["vq_embed_dim"])
        if self.decoder_dtype is not None:
            self.decoder.to(self.decoder_dtype)

    @property
    def decoder_dtype(self) -> torch.dtype | None:
        name = self.config.get("decoder_dtype")
        return getattr(torch, name) if name else None

    def _apply(self, fn, *args, **kwargs):  # .to(dtype) keeps a configured decoder dtype (as the authors' .to)
        super()._apply(fn, *args, **kwargs)
        if self.decoder_dtype is not None and self.decoder.conv_in.weight.dtype != self.decoder_dtype:
            self.decoder.to(self.decoder_dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _encode(self, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        z = torch.cat([self.quant_conv(self.encoder(frames[s:e])) for s, e in frame_chunks(B * T, chunk)])
        return z.view(B, T, *z.shape[1:]).transpose(1, 2)  # (B, m, T, h, w)

    def _decode(self, z: torch.Tensor, chunk: int | None) -> torch.Tensor:
        B, m, T, h, w = z.shape
        codes = z.transpose(1, 2).reshape(B * T, m, h, w)
        dec_dtype = self.decoder.conv_in.weight.dtype
        out = torch.cat([self.decoder(self.post_quant_conv(codes[s:e]).to(dec_dtype))
                         for s, e in frame_chunks(B * T, chunk)])
        return out.view(B, T, *out.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)

    def _frame_bytes(self, h: int, w: int, itemsize: int) -> int:
        dims, s = self.config["block_out_channels"], self.spatial_stride
        act = max(d * (h * w) * (s // 2**i) ** 2 for i, d in enumerate(dims))
        return 8 * act * itemsize + attention_bytes(h * w)
