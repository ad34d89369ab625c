"""URSA's video tokenizer: a Cosmos-style 3D autoencoder with FSQ codes (``AutoencoderVQCosmos3D``).

Facts reproduced from the authors' model (``diffnext/models/autoencoders/autoencoder_vq_cosmos3d.py``):

- Pixels are patchified by 2 levels of a Haar wavelet (:mod:`.wavelets`; frame 0 repeated 4×
  first), so a clip of ``1 + 4k`` frames enters at ``k + 1`` frames and H/4 × W/4.
- Convolutions are factorized: a (1, 3, 3) spatial conv then a (3, 1, 1) temporal conv, causal
  in time (the first frame replicated in front). Group norms have one group and normalize each
  frame on its own. ``temporal_stride = 4 = patch_size`` means no learned temporal resampling.
- The mid blocks attend spatially inside each frame, then **temporally across every latent frame
  of a tile** (single head, not causal).
- Long clips run in independent temporal tiles (the authors' ``TilingMixin``): a tile is
  ``sample_frames`` pixel frames / ``(sample_frames − 1)/4 + 1`` latent frames; tiles after the
  first drop their first decoded frame (overlap of 1 pixel frame, none in latents), and a
  trailing partial tile is **not decoded** — at the class default ``sample_frames = 17``,
  13 latent frames decode to 33 pixel frames (two tiles of 5; frames 10-12 dropped), while a
  config with ``sample_frames = 49`` decodes them in one tile to 49 frames. :meth:`num_frames`
  says which, and decoding warns when latent frames are left out.

Parameter names equal the published checkpoints' (``encoder.down_blocks.0.resnets.0.conv1.0.weight``...).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, attention_bytes, frame_chunks, per_frame
from .quantizers import COSMOS_LEVELS, FSQuantizer
from .wavelets import patchify, unpatchify

DEFAULTS = {  # the authors' class defaults (a config.json overrides them)
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "sample_frames": 17, "num_vq_embeddings": 64000, "vq_embed_dim": 6, "patch_size": 4,
    "temporal_stride": 4, "spatial_stride": 8,
}


class CausalConv3d(nn.Conv3d):
    """Conv3d with spatial zero padding and causal temporal padding (frame 0 replicated
    ``(k_t − 1) + (1 − stride_t)`` times in front). Chunked over output frames: each chunk reads
    its input frames plus the causal halo, so the result does not depend on the chunking."""

    def __init__(self, dim: int, out_dim: int, kernel=1, stride=1, padding=0, *, time_stride: int | None = None):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        st = stride[0] if time_stride is None else time_stride
        super().__init__(dim, out_dim, kernel, (st, *stride[1:]), (0, *padding[1:]))
        self.time_pad = (kernel[0] - 1) + (1 - st) if kernel[0] > 1 else 0

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        kt, st, pad = self.kernel_size[0], self.stride[0], self.time_pad
        if kt == 1 and st == 1:
            return per_frame(lambda c: self._conv_forward(c, self.weight, self.bias), x, chunk)
        T_out = (x.shape[2] + pad - kt) // st + 1
        out = None
        for s, e in frame_chunks(T_out, chunk):
            # padded frame j is input frame max(j − pad, 0): the causal replicate pad, read per chunk
            idx = (torch.arange(st * s, st * (e - 1) + kt, device=x.device) - pad).clamp_(min=0)
            y = self._conv_forward(x.index_select(2, idx), self.weight, self.bias)
            if e - s == T_out:
                return y
            if out is None:
                out = y.new_empty((*y.shape[:2], T_out, *y.shape[3:]))
            out[:, :, s:e] = y
        return out


class Factorized(nn.ModuleList):
    """(1, 3, 3) spatial conv, then (3, 1, 1) causal temporal conv (names ``.0`` and ``.1``)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__([CausalConv3d(dim, out_dim, (1, 3, 3), 1, 1), CausalConv3d(out_dim, out_dim, (3, 1, 1))])

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        return self[1](self[0](x, chunk), chunk)


class FrameGroupNorm(nn.GroupNorm):
    """Group norm of every frame on its own (the authors' ``GroupNorm2D``), optionally + SiLU."""

    def forward(self, x: torch.Tensor, chunk: int | None = None, silu: bool = False) -> torch.Tensor:
        def norm(c):
            B, C, T, H, W = c.shape
            y = F.group_norm(c.transpose(1, 2).reshape(B * T, C, H, W), self.num_groups, self.weight, self.bias,
                             self.eps)
            y = F.silu(y, inplace=True) if silu else y
            return y.view(B, T, C, H, W).transpose(1, 2)

        return per_frame(norm, x, chunk)


class Attention3d(nn.Module):
    """Single-head attention with a per-frame group norm and the residual inside.

    ``axis="space"``: tokens are the H·W positions of one frame; ``axis="time"``: tokens are the
    T frames at one position. Chunks: frames for space, rows for time (after the norm, which
    needs whole frames)."""

    def __init__(self, dim: int, axis: str):
        super().__init__()
        self.axis = axis
        self.group_norm = FrameGroupNorm(1, dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, L, C) -> (N, L, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        return self.to_out[0](F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if self.axis == "space":
            def block(c):
                n = self.group_norm(c)
                t = c.shape[2]
                o = self._attend(n.permute(0, 2, 3, 4, 1).reshape(B * t, H * W, C))
                return o.view(B, t, H, W, C).permute(0, 4, 1, 2, 3).add_(c)

            return per_frame(block, x, chunk)
        n = self.group_norm(x, chunk)
        rows = H if not chunk else max(1, (chunk * H) // max(T, 1))
        out = torch.empty_like(x)
        for r0, r1 in frame_chunks(H, rows):
            t = n[:, :, :, r0:r1].permute(0, 3, 4, 2, 1).reshape(-1, T, C)  # (B·rows·W, T, C)
            o = self._attend(t).view(B, r1 - r0, W, T, C).permute(0, 4, 3, 1, 2)
            out[:, :, :, r0:r1] = o.add_(x[:, :, :, r0:r1])
        return out


def _avg_pool(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """``F.avg_pool3d`` with stride = kernel; the CPU lacks fp16 / bf16 kernels, so there it pools
    in fp32 and rounds once (what the CUDA kernel does: fp32 accumulation, one rounding)."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return F.avg_pool3d(x.float(), kernel, kernel).to(x.dtype)
    return F.avg_pool3d(x, kernel, kernel)


class Resize3d(nn.Module):
    """Down (``spatial``/``temporal`` = 1) or up (= 2) sampling, with the authors' residual
    shortcuts (average pooling down, repetition up) and a closing 1×1×1 conv."""

    def __init__(self, dim: int, spatial: int, temporal: int):
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        self.conv1, self.conv2 = nn.Identity(), nn.Identity()
        if spatial == 1 or temporal == 1:
            self.conv1 = CausalConv3d(dim, dim, (1, 3, 3), 2, time_stride=1)
            if temporal:
                self.conv2 = CausalConv3d(dim, dim, (3, 1, 1), 1, time_stride=2)
        elif spatial == 2 or temporal == 2:
            if temporal:
                self.conv1 = CausalConv3d(dim, dim, (3, 1, 1), 1, 0)
            self.conv2 = CausalConv3d(dim, dim, (1, 3, 3), 1, 1)
        self.conv3 = CausalConv3d(dim, dim, 1) if spatial or temporal else nn.Identity()

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        if self.spatial == 1:
            def down(c):
                return self.conv1(F.pad(c, (0, 1, 0, 1, 0, 0))).add_(_avg_pool(c, (1, 2, 2)))

            x = per_frame(down, x, chunk)
        if self.temporal == 1:
            x = F.pad(x, (0, 0, 0, 0, 1, 0), "replicate")
            x = self.conv2(x).add_(_avg_pool(x, (2, 1, 1)))
        if self.temporal == 2:
            x = x.repeat_interleave(2, dim=2)[:, :, 1:]
            x = self.conv1(x, chunk).add_(x)
        if self.spatial == 2:
            def up(c):
                c = c.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
                return self.conv2(c).add_(c)

            x = per_frame(up, x, chunk)
        return self.conv3(x, chunk) if isinstance(self.conv3, CausalConv3d) else x


class ResBlock3d(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(1, dim, eps=1e-6)
        self.conv1 = Factorized(dim, out_dim)
        self.norm2 = FrameGroupNorm(1, out_dim, eps=1e-6)
        self.conv2 = Factorized(out_dim, out_dim)
        self.conv_shortcut = CausalConv3d(dim, out_dim, 1) if out_dim != dim else None

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        shortcut = self.conv_shortcut(x, chunk) if self.conv_shortcut is not None else x
        h = self.conv1(self.norm1(x, chunk, silu=True), chunk)
        return self.conv2(self.norm2(h, chunk, silu=True), chunk).add_(shortcut)


class Stage3d(nn.Module):
    """``resnets`` then an optional down- or up-sampler (the authors' ``UNetResBlock``)."""

    def __init__(self, dim: int, out_dim: int, depth: int, *, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock3d(dim if i == 0 else out_dim, out_dim) for i in range(depth))
        if downsample is not None:
            self.downsamplers = nn.ModuleList([Resize3d(out_dim, *downsample)])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Resize3d(out_dim, *upsample)])

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, chunk)
        for resize in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = resize(x, chunk)
        return x


class MidBlock3d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock3d(dim, dim), ResBlock3d(dim, dim)])
        self.attentions = nn.ModuleList([nn.ModuleList([Attention3d(dim, "space"), Attention3d(dim, "time")])])

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        x = self.resnets[0](x, chunk)
        for (space, time), resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(time(space(x, chunk), chunk), chunk)
        return x


def _log2(v: int, name: str) -> int:
    n = int(math.log2(v))
    if v < 1 or 2**n != v:
        raise ValueError(f"{name}: must be a power of two, got {v}")
    return n


class Encoder3d(nn.Module):
    def __init__(self, dim: int, out_dim: int, block_dims, depth: int, patch: int, tstride: int, sstride: int):
        super().__init__()
        self.levels = _log2(patch, "patch_size")
        sdowns = _log2(sstride, "spatial_stride") - self.levels
        tdowns = _log2(tstride, "temporal_stride") - self.levels
        self.conv_in = Factorized(dim * patch**3, block_dims[0])
        self.down_blocks = nn.ModuleList()
        for i, d in enumerate(block_dims[:-1]):
            down = (int(i < sdowns), int(i < tdowns)) if i < len(block_dims) - 2 else None
            self.down_blocks.append(Stage3d(d, block_dims[i + 1], depth, downsample=down))
        self.mid_block = MidBlock3d(block_dims[-1])
        self.conv_norm_out = FrameGroupNorm(1, block_dims[-1], eps=1e-6)
        self.conv_out = Factorized(block_dims[-1], out_dim)

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        x = self.conv_in(patchify(x, self.levels), chunk)
        for blk in self.down_blocks:
            x = blk(x, chunk)
        x = self.mid_block(x, chunk)
        return self.conv_out(self.conv_norm_out(x, chunk, silu=True), chunk)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, out_dim: int, block_dims, depth: int, patch: int, tstride: int, sstride: int):
        super().__init__()
        rev = list(reversed(block_dims))
        self.levels = _log2(patch, "patch_size")
        sups = _log2(sstride, "spatial_stride") - self.levels
        tups = _log2(tstride, "temporal_stride") - self.levels
        self.conv_in = Factorized(dim, rev[0])
        self.mid_block = MidBlock3d(rev[0])
        self.up_blocks = nn.ModuleList()
        for i, d in enumerate(rev[:-1]):
            up = None
            if i < len(rev) - 2:
                temporal = 0 < i < tups + 1
                spatial = temporal or (i < sups and sups > tups)
                up = (2 if spatial else 0, 2 if temporal else 0)
            self.up_blocks.append(Stage3d(rev[max(i - 1, 0)], d, depth + 1, upsample=up))
        self.conv_norm_out = FrameGroupNorm(1, rev[-2], eps=1e-6)
        self.conv_out = Factorized(rev[-2], out_dim * patch**3)

    def forward(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, chunk), chunk)
        for blk in self.up_blocks:
            x = blk(x, chunk)
        return unpatchify(self.conv_out(self.conv_norm_out(x, chunk, silu=True), chunk), self.levels)


class CosmosFSQTokenizer(Tokenizer):
    """The FSQ video tokenizer of URSA's FSQ320 checkpoints (K = 64,000; strides 4 × 8 × 8)."""

    class_name = "AutoencoderVQCosmos3D"

    def __init__(self, config: dict | None = None):
        cfg = {**DEFAULTS, **(config or {})}
        super().__init__(cfg)
        levels = tuple(cfg.get("fsq_levels") or COSMOS_LEVELS)  # "fsq_levels": our extension for tests
        if cfg["num_vq_embeddings"] != math.prod(levels) or cfg["vq_embed_dim"] != len(levels):
            raise ValueError(f"config: FSQ levels {levels} give K={math.prod(levels)}, m={len(levels)}, but "
                             f"num_vq_embeddings={cfg['num_vq_embeddings']}, vq_embed_dim={cfg['vq_embed_dim']}")
        self.temporal_stride, self.spatial_stride = int(cfg["temporal_stride"]), int(cfg["spatial_stride"])
        self.in_channels = int(cfg["in_channels"])
        dims, depth = tuple(cfg["block_out_channels"]), int(cfg["layers_per_block"])
        if len(dims) < 2:
            raise ValueError(f"config: block_out_channels needs at least 2 entries, got {dims}")
        geometry = (int(cfg["patch_size"]), self.temporal_stride, self.spatial_stride)
        self.encoder = Encoder3d(self.in_channels, cfg["latent_channels"], dims, depth, *geometry)
        self.decoder = Decoder3d(cfg["latent_channels"], cfg["out_channels"], dims, depth, *geometry)
        self.quant_conv = CausalConv3d(cfg["latent_channels"], len(levels), 1)
        self.post_quant_conv = CausalConv3d(len(levels), cfg["latent_channels"], 1)
        self.quantizer = FSQuantizer(levels)
        self.sample_frames = int(cfg["sample_frames"])
        self.latent_frames = (self.sample_frames - 1) // self.temporal_stride + 1

    # the authors' temporal tiling ---------------------------------------------
    def _tiles(self, T: int, size: int, step: int) -> list[slice]:
        return [slice(s, s + size) for s in range(0, T, step) if s + size <= T]

    def num_frames(self, T: int) -> int:
        if T <= self.latent_frames:
            return (T - 1) * self.temporal_stride + 1
        tiles = len(self._tiles(T, self.latent_frames, self.latent_frames))
        return tiles * (self.sample_frames - 1) + 1

    def encoded_frames(self, num_frames: int) -> int:
        """Clips of up to ``sample_frames`` frames give ``(F − 1)/4 + 1`` latent frames; longer ones
        are encoded in tiles of ``sample_frames`` overlapping by one frame (a trailing partial tile
        is dropped), each tile giving ``latent_frames``: 49 frames at ``sample_frames = 17`` give
        3 × 5 = 15 latent frames, not 13."""
        T = super().encoded_frames(num_frames)
        if num_frames <= self.sample_frames:
            return T
        return len(self._tiles(num_frames, self.sample_frames, self.sample_frames - 1)) * self.latent_frames

    def _encode(self, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        F_ = x.shape[2]
        if F_ <= self.sample_frames:
            z = self.encoder(x, chunk)
        else:  # tiles of sample_frames pixel frames overlapping by one; latents kept whole
            z = torch.cat([self.encoder(x[:, :, s], chunk)
                           for s in self._tiles(F_, self.sample_frames, self.sample_frames - 1)], 2)
        return self.quant_conv(z, chunk)

    def _decode(self, z: torch.Tensor, chunk: int | None) -> torch.Tensor:
        z = self.post_quant_conv(z, chunk)
        T = z.shape[2]
        if T <= self.latent_frames:
            return self.decoder(z, chunk)
        tiles = self._tiles(T, self.latent_frames, self.latent_frames)
        if tiles[-1].stop < T:
            warnings.warn(f"ids: latent frames {tiles[-1].stop}..{T - 1} do not fill a decoding tile of "
                          f"{self.latent_frames} (sample_frames={self.sample_frames}) and are not decoded, as in "
                          f"the authors' tiling: {T} latent frames give {self.num_frames(T)} pixel frames",
                          stacklevel=3)
        out = [self.decoder(z[:, :, s], chunk) for s in tiles]
        return torch.cat([out[0]] + [o[:, :, 1:] for o in out[1:]], 2)

    def _frame_bytes(self, h: int, w: int, itemsize: int) -> int:
        # largest per-frame activation: the last decoder stage (channels rev[-2] at 2^(up) × the latent
        # grid), ×8 for a layer's input, output and conv workspace; plus one spatial attention matrix
        dims = self.config["block_out_channels"]
        up = 2 ** (int(math.log2(self.spatial_stride)) - int(math.log2(self.config["patch_size"])))
        act = max(dims[-1] * h * w, dims[1] * h * w * up * up, 3 * self.config["patch_size"] ** 3 * h * w * up * up)
        return 8 * act * itemsize + attention_bytes(h * w)
