"""Conditioning (DESIGN §2.4): known frames given as pixels (``image=`` / ``video=``) or tokens
(``cond_latents``), and the sliding-window extrapolation of long videos built on them.

- Pixel arguments are uint8 RGB, channels last, as the authors' pipeline takes them: an image
  ``(H, W, 3)``, a PIL image, a batch ``(B, H, W, 3)`` (or a list of images); a video
  ``(F, H, W, 3)`` or ``(B, F, H, W, 3)``. They are checked and shaped before anything is
  encoded; every error names the argument.
- :func:`encode_pixels`: pixels -> codes with the checkpoint's tokenizer (``Engine.encode_condition``).
- :func:`condition_frames`: codes -> the frames they fix in a generation, resampled from the path
  at ``t = 1 − cond_noise_scale`` when asked (``Engine.generate``).
- :func:`extrapolate`: windows conditioned on the newest frames so far (``Engine.extrapolate``).
- Inpainting (token level, DESIGN §2.4): :func:`kept_tokens` maps a pixel mask of kept pixels to
  the tokens whose whole patch is kept; :func:`encode_inpaint` gives an image's known tokens and
  that mask; :func:`keep_from_mask_image` reads a mask image in OpenAI's or diffusers' convention;
  :func:`known_region` checks ``Engine.generate``'s ``known_tokens`` / ``known_mask``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import _validate
from .results import GenerationResult, timed_decode


# ---------------------------------------------------------------------------- pixel arguments
def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _to_array(x, name: str):
    if _is_pil(x):
        return np.asarray(x.convert("RGB"))
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: got an empty list")
        items = [_to_array(v, name) for v in x]
        shapes = {tuple(v.shape) for v in items}
        if len(shapes) != 1:
            raise ValueError(f"{name}: the listed images have different shapes {sorted(shapes)}")
        return np.stack(items)
    if isinstance(x, torch.Tensor):
        return x
    return np.asarray(x)


def is_pixels(x) -> bool:
    """Whether a ``video=`` argument is uint8 pixels (last dim 3) rather than integer tokens."""
    if _is_pil(x) or (isinstance(x, (list, tuple)) and x and _is_pil(x[0])):
        return True
    dtype = x.dtype if isinstance(x, (torch.Tensor, np.ndarray)) else None
    return dtype in (torch.uint8, np.uint8) and x.ndim in (4, 5) and x.shape[-1] == 3


def as_frames(x, name: str, *, image: bool) -> torch.Tensor:
    """uint8 pixels -> a (B, F, H, W, 3) uint8 tensor (images get F = 1)."""
    t = _to_array(x, name)
    if not isinstance(t, torch.Tensor):
        t = np.ascontiguousarray(t)
        t = torch.from_numpy(t if t.flags.writeable else t.copy())  # PIL arrays are read-only
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 RGB pixels (0..255), got {t.dtype}")
    forms = "(H, W, 3) or (B, H, W, 3)" if image else "(F, H, W, 3) or (B, F, H, W, 3)"
    if t.dim() not in ((3, 4) if image else (4, 5)) or t.shape[-1] != 3 or 0 in t.shape:
        raise ValueError(f"{name}: expected {forms} uint8 RGB pixels, got shape {tuple(t.shape)}")
    if image:
        return t[None, None] if t.dim() == 3 else t[:, None]
    return t[None] if t.dim() == 4 else t


def check_size(frames: torch.Tensor, name: str, grid: tuple[int, int], stride: int) -> None:
    """Pixel height / width must be the latent grid times the tokenizer's spatial stride."""
    H, W = frames.shape[2:4]
    h, w = grid
    if (H, W) != (h * stride, w * stride):
        raise ValueError(f"{name}: frames of {H}x{W} pixels (HxW), but the latent grid {h}x{w} needs "
                         f"{h * stride}x{w * stride} (spatial stride {stride})")


def check_batch(frames: torch.Tensor, name: str, batch: int) -> None:
    if frames.shape[0] not in (1, batch):
        raise ValueError(f"{name}: a batch of {frames.shape[0]}, but there are {batch} prompts (expected 1 or {batch})")


def cond_frame_count(num_frames: int, num_cond_frames, temporal_stride: int, name: str = "video") -> int:
    """The number of (last) video frames to encode: ``num_cond_frames`` or all, checked to be 1 + s·k."""
    n = num_frames if num_cond_frames is None else num_cond_frames
    what = "num_cond_frames" if num_cond_frames is not None else name
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_cond_frames: expected a positive int, got {num_cond_frames!r}")
    if n > num_frames:
        raise ValueError(f"num_cond_frames: {n} frames asked, but {name} has only {num_frames}")
    s = temporal_stride
    if s > 1 and (n - 1) % s:
        hint = "" if num_cond_frames is not None else " (or pass num_cond_frames= to use its last 1 + s·k)"
        raise ValueError(f"{what}: the video tokenizer encodes 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...), "
                         f"got {n}{hint}")
    return int(n)


def as_index_list(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


# ---------------------------------------------------------------------------- tokens from pixels
def encode_pixels(vae, *, image=None, video=None, latents_shape, num_cond_frames: int | None = None,
                  batch: int | None = None) -> torch.Tensor:
    """(B or 1, Tc, h, w) codes of ``image`` or ``video`` by ``vae``, on its device; the parameters
    are those of :meth:`Engine.encode_condition`."""
    if image is not None and video is not None:
        raise ValueError("image, video: give one of them, not both")
    if image is None and video is None:
        raise ValueError("image, video: nothing to encode")
    name = "image" if image is not None else "video"
    if num_cond_frames is not None and video is None:
        raise ValueError("num_cond_frames: applies to video= only")
    if vae is None:
        raise ValueError(f"{name}: pixel conditioning needs the checkpoint's tokenizer (root/vae/ or "
                         "Engine(vae=)); pass cond_latents tokens instead")
    T, h, w = _validate.latents_shape(latents_shape)
    frames = as_frames(image if image is not None else video, name, image=image is not None)
    check_size(frames, name, (h, w), vae.spatial_stride)
    if batch is not None:
        check_batch(frames, name, batch)
    if video is not None:
        n = cond_frame_count(frames.shape[1], num_cond_frames, vae.temporal_stride)
        frames = frames[:, frames.shape[1] - n:]
    what = "num_cond_frames" if num_cond_frames is not None else name
    n = frames.shape[1]
    Tc, whole = vae.encoded_frames(n), vae.latent_shape(*frames.shape[1:4])[0]
    if Tc != whole:  # the authors' encode tiles drop or repeat frames of clips longer than a tile
        raise ValueError(f"{what}: {n} frames are encoded in temporal tiles of {vae.sample_frames} frames "
                         f"(the tokenizer's sample_frames) to {Tc} latent frames, not the {whole} that "
                         f"{n} frames stand for; give at most {vae.sample_frames} frames")
    if Tc > T:
        raise ValueError(f"{what}: {n} frames encode to {Tc} latent frames, more than the {T} generated "
                         "(latents_shape)")
    codes = vae.encode_frames(frames)
    return codes


# ---------------------------------------------------------------------------- conditioning frames
def condition_frames(cond_latents, cond_indices, B: int, shape: tuple[int, int, int], path, noise_scale: float,
                     seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (T,) bool, values (B, T, H, W)) of the conditioning frames, noised if asked.

    ``cond_latents`` are (B or 1, Tc, H, W) codes of ``path``, ``cond_indices`` the frames they go
    to (see :meth:`Engine.generate`); the tensors are made on the device of ``seeds`` (B,).
    """
    T, H, W = shape
    K = path.size
    device = seeds.device
    cond = torch.as_tensor(cond_latents, device=device)
    if cond.is_floating_point() or cond.is_complex():
        raise TypeError(f"cond_latents: expected integer tokens, got {cond.dtype}")
    cond = cond[None] if cond.dim() == 3 else cond
    if cond.dim() != 4 or cond.shape[0] not in (1, B) or tuple(cond.shape[2:]) != (H, W):
        raise ValueError(f"cond_latents: expected (B or 1, frames, {H}, {W}), got {tuple(cond.shape)}")
    if cond.numel() and (cond.min() < 0 or cond.max() >= K):
        raise ValueError(f"cond_latents: tokens must lie in [0, {K})")
    Tc = cond.shape[1]
    if cond_indices is None:
        if Tc > T:
            raise ValueError(f"cond_latents: {Tc} frames do not fit in {T} latent frames")
        targets, sources = list(range(Tc)), list(range(Tc))
    else:
        targets = [i % T if -T <= i < T else None for i in as_index_list(cond_indices)]
        if None in targets or len(set(targets)) != len(targets):
            raise ValueError(f"cond_indices: expected distinct frame indices in [-{T}, {T}), got {cond_indices}")
        if Tc == len(targets):
            sources = list(range(Tc))  # the j-th given frame goes to frame cond_indices[j]
        elif Tc == T:
            sources = targets  # a full-length video: its frames at cond_indices are used (URSA)
        else:
            raise ValueError(f"cond_latents: {Tc} frames match neither len(cond_indices)={len(targets)} nor T={T}")
    values = torch.zeros(B, T, H, W, dtype=torch.long, device=device)
    values[:, targets] = cond[:, sources].long().expand(B, -1, -1, -1)
    mask = torch.zeros(T, dtype=torch.bool, device=device)
    mask[targets] = True
    if not 0.0 <= noise_scale <= 1.0:
        raise ValueError(f"cond_noise_scale: must be in [0, 1], got {noise_scale}")
    if noise_scale > 0:  # resample the given frames from p_t(. | cond) at t = 1 − scale (§2.4)
        values = path.sample(values, 1.0 - noise_scale, seed=seeds)
    return mask, values


# ---------------------------------------------------------------------------- inpainting (token level)
def _as_bool_mask(mask, name: str) -> torch.Tensor:
    """A bool tensor from bool or 0/1 integer values (numpy / torch / nested lists); floats are refused."""
    t = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask, copy=True))
    if t.dtype == torch.bool:
        return t
    if t.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"{name}: expected a bool mask (or 0/1 integers), got {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{name}: integer masks must hold only 0 and 1, got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.bool()


def kept_tokens(keep, stride, *, name: str = "keep") -> torch.Tensor:
    """The token mask of a pixel mask: a token is kept iff every pixel of its patch is kept.

    Parameters
    ----------
    keep : bool (H, W) or (F, H, W) of *kept* pixels (True: keep, False: regenerate); 0/1 integers
        are accepted, floats refused. numpy or torch, any device
    stride : the tokenizer's spatial stride ``s`` (frames mapped one to one), or
        ``(temporal_stride, s)``: then ``F = 1 + ts·k`` frames give ``k + 1`` latent frames, frame 0
        alone and then groups of ``ts`` (the causal video tokenizers, :mod:`ursa_engine.vae`); a latent
        frame is kept where every pixel of every frame it stands for is kept
    name : the argument named in errors

    Returns
    -------
    bool (H/s, W/s) for a (H, W) mask, else (T, H/s, W/s), on ``keep``'s device

    Raises
    ------
    ValueError naming ``name`` when H or W is not a multiple of ``s`` or F is not ``1 + ts·k``.
    """
    ts, s = (1, stride) if not isinstance(stride, (tuple, list)) else stride
    for what, v in (("temporal stride", ts), ("spatial stride", s)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"stride: expected a positive int {what}, got {v!r}")
    m = _as_bool_mask(keep, name)
    if m.dim() not in (2, 3) or 0 in m.shape:
        raise ValueError(f"{name}: expected a (H, W) or (F, H, W) mask, got shape {tuple(m.shape)}")
    plane = m.dim() == 2
    m = m[None] if plane else m
    F, H, W = m.shape
    if H % s or W % s:
        raise ValueError(f"{name}: a {H}x{W} mask (HxW) does not split into the tokenizer's {s}x{s} patches; "
                         f"height and width must be multiples of {s}")
    if ts > 1 and (F - 1) % ts:
        raise ValueError(f"{name}: {F} frames; the video tokenizer takes 1 + {ts}k frames (1, {1 + ts}, ...)")
    tokens = m.reshape(F, H // s, s, W // s, s).all(4).all(2)  # (F, h, w)
    if ts > 1:  # frame 0 alone, then groups of ts frames per latent frame
        rest = tokens[1:].reshape(-1, ts, H // s, W // s).all(1)
        tokens = torch.cat([tokens[:1], rest])
    return tokens[0] if plane else tokens


def keep_from_mask_image(mask, name: str = "mask") -> torch.Tensor:
    """bool (H, W) of kept pixels from an inpainting mask image, in the one of two conventions it uses.

    * **With an alpha channel** (a PIL image with an alpha band or transparency, an (H, W, 4) array):
      OpenAI's ``images.edit`` convention: fully transparent pixels (alpha 0) are regenerated,
      every other pixel is kept (colours are ignored).
    * **Without alpha**: diffusers' inpainting convention: white marks what to repaint, black what
      to keep. A PIL image is read as grey levels ``L`` and ``L >= 128`` is repainted; arrays:
      bool (H, W) True = repaint; uint8 (H, W), (H, W, 1) or (H, W, 3) grey / RGB (mean of the
      channels) ``>= 128`` repainted; float (H, W) in [0, 1] ``>= 0.5`` repainted.
    """
    if _is_pil(mask):
        bands = mask.getbands()
        if "A" in bands or "a" in bands or "transparency" in mask.info:
            return torch.from_numpy(np.array(mask.convert("RGBA"))[..., 3] != 0)
        return torch.from_numpy(np.array(mask.convert("L")) < 128)
    t = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask, copy=True))
    if t.dim() == 3 and t.shape[-1] == 4:
        if t.dtype != torch.uint8:
            raise TypeError(f"{name}: an (H, W, 4) mask must be uint8 RGBA, got {t.dtype}")
        return t[..., 3] != 0
    if t.dim() == 3 and t.shape[-1] in (1, 3):
        if t.dtype != torch.uint8:
            raise TypeError(f"{name}: an (H, W, {t.shape[-1]}) mask must be uint8, got {t.dtype}")
        t = t.float().mean(-1)
        return t < 128
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name}: expected a mask image (H, W), (H, W, 1 | 3 | 4) or PIL, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return ~t
    if t.dtype == torch.uint8:
        return t < 128
    if t.is_floating_point():
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{name}: a float mask must lie in [0, 1]")
        return t < 0.5
    raise TypeError(f"{name}: expected a bool, uint8 or float mask, got {t.dtype}")


def encode_inpaint(vae, image, keep, latents_shape=None, *, name: str = "keep",
                   image_name: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """Known tokens and their mask for inpainting ``image`` where ``keep`` is False (DESIGN §2.4).

    Parameters
    ----------
    vae : the checkpoint's tokenizer (:mod:`ursa_engine.vae`) of spatial stride ``s``
    image : uint8 (H, W, 3) or a PIL image (one image; it is the known content)
    keep : bool (H, W) of *kept* pixels (0/1 integers accepted; see :func:`keep_from_mask_image`
        for mask images); its size must be the image's
    latents_shape : (T, h, w) of the generation; default ``(1, H/s, W/s)``. The image is encoded as
        one frame, which any tokenizer maps to one latent frame: frame 0 of the generation (for a
        video tokenizer, the first latent frame, which stands for pixel frame 0 alone). Frames
        ``1..T-1`` have no known token (an image-to-video whose first frame is partly regenerated)
    name, image_name : the arguments named in errors

    Returns
    -------
    (known_tokens (1, T, h, w) int64, known_mask (T, h, w) bool), on the tokenizer's device: a token
    is known iff every pixel of its s × s patch is kept (:func:`kept_tokens`); its value is the
    image's code there (codes of unkept tokens are the image's too, but ignored).
    """
    if vae is None:
        raise ValueError(f"{image_name}: inpainting pixels needs the checkpoint's tokenizer (root/vae/ or "
                         "Engine(vae=)); pass known_tokens / known_mask instead")
    frames = as_frames(image, image_name, image=True)  # (B, 1, H, W, 3)
    if frames.shape[0] != 1:
        raise ValueError(f"{image_name}: inpainting takes one image (H, W, 3), got a batch of {frames.shape[0]}")
    H, W = frames.shape[2:4]
    s = vae.spatial_stride
    m = _as_bool_mask(keep, name)
    if tuple(m.shape) != (H, W):
        raise ValueError(f"{name}: a mask of shape {tuple(m.shape)} for an image of {H}x{W} pixels; "
                         f"expected ({H}, {W})")
    if H % s or W % s:
        raise ValueError(f"{image_name}: {H}x{W} pixels (HxW) are not multiples of the tokenizer's spatial "
                         f"stride {s}")
    T, h, w = (1, H // s, W // s) if latents_shape is None else _validate.latents_shape(latents_shape)
    check_size(frames, image_name, (h, w), s)
    codes = vae.encode_frames(frames)  # (1, 1, h, w)
    device = codes.device
    tokens = torch.zeros(1, T, h, w, dtype=torch.long, device=device)
    tokens[:, 0] = codes[:, 0]
    mask = torch.zeros(T, h, w, dtype=torch.bool, device=device)
    mask[0] = kept_tokens(m, s, name=name).to(device)
    return tokens, mask


def known_region(known_tokens, known_mask, B: int, shape: tuple[int, int, int], K: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``Engine.generate``'s ``known_tokens`` / ``known_mask``: (mask (T, H, W) bool, values (B, T, H, W)).

    ``known_tokens``: integer codes (B or 1, T, H, W) or (T, H, W), in [0, K) where the mask is
    True (elsewhere anything: ignored); ``known_mask``: bool (T, H, W) or (1, T, H, W), one region
    for the whole batch; 0/1 integers are accepted, floats refused.
    """
    if known_tokens is None or known_mask is None:
        missing = "known_mask" if known_mask is None else "known_tokens"
        raise ValueError(f"{missing}: known_tokens and known_mask go together (give both)")
    T, H, W = shape
    mask = _as_bool_mask(known_mask, "known_mask").to(device)
    mask = mask[0] if mask.dim() == 4 and mask.shape[0] == 1 else mask
    if tuple(mask.shape) != shape:
        raise ValueError(f"known_mask: expected ({T}, {H}, {W}) (latents_shape) or (1, {T}, {H}, {W}), "
                         f"got {tuple(torch.as_tensor(known_mask).shape)}")
    tokens = torch.as_tensor(known_tokens, device=device)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"known_tokens: expected integer codes, got {tokens.dtype}")
    tokens = tokens[None] if tokens.dim() == 3 else tokens
    if tokens.dim() != 4 or tokens.shape[0] not in (1, B) or tuple(tokens.shape[1:]) != shape:
        raise ValueError(f"known_tokens: expected (B or 1, {T}, {H}, {W}) or ({T}, {H}, {W}) with B = {B}, "
                         f"got {tuple(tokens.shape)}")
    held = tokens[:, mask]
    if held.numel() and (held.min() < 0 or held.max() >= K):
        raise ValueError(f"known_tokens: codes under known_mask must lie in [0, {K}), got "
                         f"[{int(held.min())}, {int(held.max())}]")
    values = torch.where(mask, tokens.long(), 0).expand(B, -1, -1, -1).contiguous()
    return mask, values


# ---------------------------------------------------------------------------- long videos
def extrapolate(engine, prompt_ids, *, num_windows: int, latents_shape, video, history_frames: int,
                history_t: float, seed: int, decode: bool, **kwargs) -> GenerationResult:
    """Long video by a sliding window (paper appendix E, DESIGN §2.4).

    Each new window of ``T`` latent frames is conditioned on the newest ``history_frames``
    latent frames generated so far, resampled from the path at ``t = history_t`` (0.9), and
    contributes its ``T − history_frames`` new frames. The paper's "most recent 13 frames"
    are pixel frames: (13 − 1)/4 + 1 = 4 latent frames, so a 49-frame window adds 36 pixel
    frames (49 + 12·36 = 481, its Figure 7).

    Parameters
    ----------
    engine : the :class:`Engine` whose :meth:`Engine.generate` makes every window
    prompt_ids : as for :meth:`Engine.generate`
    num_windows : windows generated after the first one
    latents_shape : (T, H, W) of one window (``Engine.extrapolate``: 13 × 40 × 64, 49 frames of 320 × 512)
    history_frames, history_t : latent frames each window is conditioned on (4), and the time they are
        resampled at (0.9)
    seed : the first window uses ``seed``, window ``w`` ``seed + (w << 32)`` (sample ``b`` adds ``b``)
    video : what to extend: (B, T0, H, W) integer tokens, or (with a tokenizer) uint8 pixels
        (F, H·s, W·s, 3) / (B, F, H·s, W·s, 3) of which the last ``1 + s·(history_frames − 1)``
        frames (13 for the video tokenizer) are encoded, as the authors' README loop does with
        ``video[-num_cond_frames:]``; default: a first window generated from the prompt (from
        ``image=`` too, when given)
    decode : with a tokenizer, return ``frames`` (default True)
    kwargs : forwarded to :meth:`Engine.generate` (guidance, steps, motion, ...)

    Returns
    -------
    GenerationResult: ``tokens`` = the given token video (for pixels: its encoded history
    frames) followed by every window's new frames; ``frames`` = the given pixels (or the decoded
    given tokens / first window) followed by every window's new frames. Windows are decoded one
    by one, each as the authors' pipeline decodes a call (``vae.num_frames(T)`` pixel frames),
    dropping the first ``vae.num_frames(history_frames)`` frames that re-show the history: the
    frames equal the README's ``concatenate([start_video, video[num_cond_frames:]])`` loop, the
    decoder never sees more than one window (memory bounded, no temporal tile cut through the
    video), and the given pixels are kept as they are. ``decode_time`` covers all decoding.
    """
    T, H, W = _validate.latents_shape(latents_shape)
    if not 0 < history_frames < T:
        raise ValueError(f"history_frames: must be in [1, {T}) for a {T}-frame window, got {history_frames}")
    if not isinstance(num_windows, int) or num_windows < 0:
        raise ValueError(f"num_windows: must be an int >= 0, got {num_windows!r}")
    for bad in ("cond_latents", "cond_indices", "cond_noise_scale", "latents", "num_cond_frames"):
        if bad in kwargs:
            raise ValueError(f"{bad}: set by extrapolate itself")
    image = kwargs.pop("image", None)
    if image is not None and video is not None:
        raise ValueError("image: conditions a first window, but video= is given (nothing is generated from the "
                         "prompt alone)")
    t_start = time.perf_counter()
    B = engine.encode_prompts(prompt_ids, motion=kwargs.get("motion"), length=kwargs.get("prompt_length")).shape[0]
    pixels = None
    if video is not None and is_pixels(video):
        if engine.vae is None:
            raise ValueError("video: pixel frames need the checkpoint's tokenizer (root/vae/ or Engine(vae=)); "
                             "pass tokens instead")
        pixels = as_frames(video, "video", image=False)
        need = (history_frames - 1) * engine.vae.temporal_stride + 1
        if pixels.shape[1] < need:
            raise ValueError(f"video: {pixels.shape[1]} frames, fewer than the {need} pixel frames of "
                             f"history_frames={history_frames}")
        video = engine.encode_condition(video=pixels, latents_shape=(T, H, W), num_cond_frames=need, batch=B)
    results = []
    if video is None:
        results.append(engine.generate(prompt_ids, latents_shape=(T, H, W), seed=seed, image=image, decode=False,
                                       **kwargs))
        video = results[0].tokens
    video = torch.as_tensor(video, device=engine.device)
    if video.is_floating_point() or video.is_complex():
        raise TypeError(f"video: expected integer tokens or uint8 pixels (..., 3), got {video.dtype}")
    if video.dim() != 4 or tuple(video.shape[2:]) != (H, W) or video.shape[1] < history_frames:
        raise ValueError(f"video: expected (B, >= {history_frames}, {H}, {W}) tokens, got {tuple(video.shape)}")
    if video.shape[0] not in (1, B):
        raise ValueError(f"video: a batch of {video.shape[0]}, but there are {B} prompts (expected 1 or {B})")
    given, windows = video, []
    for w in range(1, num_windows + 1):
        r = engine.generate(prompt_ids, latents_shape=(T, H, W), seed=seed + (w << 32), decode=False,
                            cond_latents=video[:, -history_frames:], cond_noise_scale=1.0 - history_t, **kwargs)
        video = torch.cat([video.expand(B, -1, -1, -1), r.tokens[:, history_frames:]], 1)
        results.append(r)
        windows.append(r.tokens)
    mems = [r.peak_memory for r in results if r.peak_memory is not None]
    out = GenerationResult(
        tokens=video, step_times=[t for r in results for t in r.step_times],
        peak_memory=max(mems) if mems else None, model_calls=sum(r.model_calls for r in results),
        guided_steps=sum(r.guided_steps for r in results),
        mode=results[-1].mode if results else "eager", attention=results[-1].attention if results else "")
    if decode and engine.vae is not None:
        skip = engine.vae.num_frames(history_frames)
        parts, peaks = [], []
        for i, tokens in enumerate([None if pixels is not None else given, *windows]):
            if tokens is None:
                parts.append(pixels.cpu().numpy())
                continue
            frames, seconds, peak = timed_decode(engine.decode, engine.vae.device, tokens)
            parts.append(frames if i == 0 else frames[:, skip:])
            out.decode_time += seconds
            peaks.append(peak)
        n = max(p.shape[0] for p in parts)
        out.frames = np.concatenate([np.broadcast_to(p, (n, *p.shape[1:])) for p in parts], 1)
        out.decode_peak_memory = max(peaks) if peaks and peaks[0] is not None else None
    out.total_time = time.perf_counter() - t_start
    return out
