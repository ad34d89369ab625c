"""Generation: the denoising loop over :class:`URSATransformer` and :class:`Scheduler` (DESIGN §4, §8).

One step ``k``: the transformer reads ``[prompt, BOV, x]`` for the conditional rows and, while
guidance is on (``guidance_scale != 1`` and ``t_k < guidance_trunc``), the unconditional rows in
the same 2B batch; the scheduler turns the latent logits into ``x_{t_{k+1}}``. Past the
truncation only the B conditional rows run. Step 0 of the metric path is skipped: ``β̇(0) = 0``
makes it the identity (§2.2).

Randomness (§2.5): sample ``b`` uses seed ``seed + b`` for everything (initial noise, conditioning
noise, every step), so a prompt's result does not depend on its batch neighbours. The initial
tokens are ``(w · K) >> 32`` of Philox lane 0 under :data:`TAG_INIT` (the masked path starts
from the mask id instead).

CUDA graphs (``mode="graph"``): the body of a step (transformer, sampler, writing the new tokens
back into the input ids) is captured once per batch layout (2B with guidance, B without) with
static buffers; the step index lives in a device tensor, so one graph serves every step and the
sampler reads t, h, β, β̇ and the RNG step from device memory. Replays produce the same tokens as
eager mode. The last step (k = N − 1) runs eagerly (the scheduler takes it as a python int).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import _dispatch, _pixels, _validate
from .attention import ATTENTION_BACKENDS
from .model import URSATransformer, latent_positions, sequence_ids
from .model_ops import MODEL_OP_BACKENDS
from .paths import MaskPath, MetricPath
from .reference.rng import TAG_INIT, random_words, to_below
from .scheduler import Scheduler
from .tokenizer import PROMPT_LENGTH, PromptTokenizer, pad_prompt_ids

SAMPLER_BACKENDS = ("auto", *_dispatch.BACKENDS)
NEGATIVE_PROMPT = "worst quality, low quality, inconsistent motion, static, still, blurry, jittery, distorted, ugly"
MODES = ("auto", "eager", "graph")


@dataclass
class GenerationResult:
    """What :meth:`Engine.generate` returns.

    tokens : (B, T, H, W) int64 latent tokens
    frames : (B, F, H·s, W·s, 3) uint8 pixels decoded by the engine's tokenizer (``F = vae.num_frames(T)``);
        None without a tokenizer or with ``decode=False``
    step_times : seconds of each of the N steps (a skipped step counts its ~0 host time); never
        includes encoding or decoding pixels
    peak_memory : peak bytes allocated on the CUDA device during the steps (None on the CPU)
    total_time : wall seconds of the whole call (pixel encoding and decoding included)
    decode_time : seconds spent decoding tokens to ``frames`` (0 when nothing was decoded)
    decode_peak_memory : peak bytes allocated on the tokenizer's CUDA device while decoding
    model_calls : transformer evaluations; guided_steps : steps run as a 2B batch
    mode, attention : what ran ("eager" / "graph", the attention backend chosen)
    """

    tokens: torch.Tensor
    frames: np.ndarray | None = None
    step_times: list[float] = field(default_factory=list)
    peak_memory: int | None = None
    total_time: float = 0.0
    decode_time: float = 0.0
    decode_peak_memory: int | None = None
    model_calls: int = 0
    guided_steps: int = 0
    mode: str = "eager"
    attention: str = ""


def _validate_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"prompt_length: expected an int >= 0, got {length!r}")
    return length


def _as_index_list(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


class Engine:
    """Batched generation with an URSA transformer and a scheduler (DESIGN §8).

    Parameters
    ----------
    model : URSATransformer
    scheduler : Scheduler; its path's K must equal the model's ``lm_head_size``
    tokenizer : PromptTokenizer, optional (needed only for text prompts)
    mode : "auto" (graphs on CUDA), "eager" or "graph"
    attn_backend, ops_backend : set on the model (see :mod:`ursa_engine.attention`, ``model_ops``)
    sampler_backend : the scheduler's ``backend=``
    prompt_length : prompts are left-padded / truncated to this many ids (URSA: 320)
    default_steps : steps when ``generate`` gets no ``num_steps``: None (the scheduler's), an int,
        or ``"authors"`` (25 for images, 50 for video; what ``from_pretrained`` uses)
    validate_steps : let the scheduler check logits for NaN / tokens for range at every eager
        step (a host sync each; graph replays never check)
    vae : a :class:`ursa_engine.vae.Tokenizer` (pixels <-> codes), optional: needed for ``image=`` /
        ``video=`` conditioning and for decoded ``frames``; its K must equal the scheduler's
    """

    def __init__(self, model: URSATransformer, scheduler: Scheduler, *, tokenizer: PromptTokenizer | None = None,
                 mode: str = "auto", attn_backend: str | None = None, ops_backend: str | None = None,
                 sampler_backend: str = "auto", prompt_length: int = PROMPT_LENGTH,
                 default_steps: int | str | None = None, validate_steps: bool = False, vae=None):
        if not isinstance(model, URSATransformer):
            raise TypeError(f"model: expected an URSATransformer, got {type(model).__name__}")
        if not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler: expected a ue.Scheduler, got {type(scheduler).__name__}")
        K = model.config.lm_head_size
        if scheduler.path.size != K:
            raise ValueError(f"scheduler: its path has K={scheduler.path.size} codes but the model's lm_head "
                             f"predicts {K}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        for name, value, allowed in (("attn_backend", attn_backend, ATTENTION_BACKENDS),
                                     ("ops_backend", ops_backend, MODEL_OP_BACKENDS),
                                     ("sampler_backend", sampler_backend, SAMPLER_BACKENDS)):
            if value is not None and value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if vae is not None:
            if not all(hasattr(vae, a) for a in ("codebook_size", "encode_frames", "decode_frames", "latent_shape")):
                raise TypeError(f"vae: expected a ursa_engine.vae.Tokenizer, got {type(vae).__name__}")
            if vae.codebook_size != K:
                raise ValueError(f"vae: the tokenizer has K={vae.codebook_size} codes but the scheduler's path has "
                                 f"K={K}")
        self.model, self.scheduler, self.tokenizer, self.vae = model, scheduler, tokenizer, vae
        self.mode, self.sampler_backend, self.prompt_length = mode, sampler_backend, int(prompt_length)
        if not (default_steps is None or default_steps == "authors" or isinstance(default_steps, int)):
            raise ValueError(f"default_steps: expected None, an int or 'authors', got {default_steps!r}")
        self.default_steps, self.validate_steps = default_steps, validate_steps
        self._schedulers: dict[tuple, Scheduler] = {}
        if attn_backend is not None:
            model.attn_backend = attn_backend
        if ops_backend is not None:
            model.ops_backend = ops_backend
        self._graphs: dict = {}
        self._tuned: dict[tuple, str] = {}  # layout -> the sampler backend "auto" resolved to

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, root: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                        num_steps: int | None = None, shift: float | None = None, variant: str | None = None,
                        load_vae: bool = True, **options) -> Engine:
        """Load ``root/transformer``, ``root/scheduler`` (codebook, alpha, c, shift) and, when
        present, ``root/tokenizer`` (prompts) and ``root/vae`` (pixels, :func:`ursa_engine.vae.load_tokenizer`,
        in the engine's dtype and on its device). A given ``shift`` overrides the checkpoint's; without
        ``num_steps`` generation takes the authors' defaults (25 steps for images, 50 for video).
        ``variant`` picks ``*.<variant>.safetensors`` weights (transformer and vae); ``load_vae=False``
        skips the vae (tokens only).
        """
        from .compat import KineticOptimalScheduler

        root = Path(root)
        for sub in ("transformer", "scheduler"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"root: {root} has no {sub}/ folder (expected transformer/, scheduler/, "
                                        "optionally tokenizer/ and vae/)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None and torch.device(device).type == "cuda":
            dtype = torch.bfloat16  # DESIGN §4
        loaded = KineticOptimalScheduler.from_pretrained(root / "scheduler")
        vae = None
        if load_vae and (root / "vae").is_dir():
            from .vae import load_tokenizer

            vae = load_tokenizer(root / "vae", dtype=dtype, device=device, variant=variant)
            if vae.codebook_size != loaded.path.size:
                raise ValueError(f"root: {root / 'vae'} has a tokenizer of K={vae.codebook_size} codes but the "
                                 f"codebook of {root / 'scheduler'} has K={loaded.path.size}")
        model = URSATransformer.from_pretrained(root / "transformer", dtype=dtype, device=device, variant=variant)
        if vae is not None and dtype is None:
            vae.to(dtype=model.dtype)  # the engine's dtype: the transformer checkpoint's own
        sched = Scheduler(loaded.path, num_steps or 50, shift=loaded.shift if shift is None else shift)
        tokenizer = None
        if (root / "tokenizer" / "tokenizer.json").is_file():
            tokenizer = PromptTokenizer.from_pretrained(root / "tokenizer",
                                                        length=options.get("prompt_length", PROMPT_LENGTH))
        return cls(model, sched, tokenizer=tokenizer, default_steps=num_steps or "authors", vae=vae, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> Engine:
        """Move (and optionally cast) the transformer and the vae; captured graphs are dropped."""
        self.release_graphs()
        self.model.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and their memory pool (kept between calls by design)."""
        self._graphs.clear()
        self._tuned.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ inputs
    def encode_prompts(self, prompts, *, motion: float | None = None, name: str = "prompt_ids",
                       length: int | None = None) -> torch.Tensor:
        """(B, length) ids from strings (needs the tokenizer), id lists or an id tensor; ``length``
        defaults to the engine's ``prompt_length``."""
        length = self.prompt_length if length is None else _validate_length(length)
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(p, str) for p in prompts)):
            if self.tokenizer is None:
                raise ValueError(f"{name}: text prompts need a tokenizer (root/tokenizer/ or Engine(tokenizer=)); "
                                 "pass token ids instead")
            motion = motion if name == "prompt_ids" else None
            return self.tokenizer.encode(prompts, motion=motion, length=length).to(self.device)
        if motion is not None and name == "prompt_ids":
            raise ValueError("motion: applies to text prompts only; put the prefix in the ids yourself")
        if isinstance(prompts, torch.Tensor) and prompts.dim() not in (1, 2):
            raise ValueError(f"{name}: expected (B, P) ids, got shape {tuple(prompts.shape)}")
        if not isinstance(prompts, torch.Tensor) and (not prompts or not isinstance(prompts[0], (list, tuple))):
            raise ValueError(f"{name}: expected a string, a list of strings, a list of id lists or an id tensor")
        pad = self.tokenizer.pad_id if self.tokenizer is not None else self.model.config.pad_token_id
        ids = pad_prompt_ids(prompts, pad, length)
        vocab = self.model.config.lm_vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"{name}: ids must be text ids in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids.to(self.device)

    def encode_condition(self, *, image=None, video=None, latents_shape, num_cond_frames: int | None = None,
                         batch: int | None = None) -> torch.Tensor:
        """Conditioning tokens from pixels, with the engine's tokenizer (DESIGN §2.4).

        Parameters
        ----------
        image : uint8 (H, W, 3), a PIL image, (B, H, W, 3) or a list of images: one latent frame each
        video : uint8 (F, H, W, 3) or (B, F, H, W, 3): its **last** ``num_cond_frames`` frames are
            encoded (default: all of them); a video tokenizer of temporal stride s takes 1 + s·k
            frames, which give k + 1 latent frames
        latents_shape : (T, h, w) of the generation: pixels must be h·stride × w·stride and give at
            most T latent frames
        batch : the number of prompts; the pixel batch must be 1 or that

        Returns
        -------
        (B or 1, Tc, h, w) int64 codes on the engine's device
        """
        if image is not None and video is not None:
            raise ValueError("image, video: give one of them, not both")
        if image is None and video is None:
            raise ValueError("image, video: nothing to encode")
        name = "image" if image is not None else "video"
        if num_cond_frames is not None and video is None:
            raise ValueError("num_cond_frames: applies to video= only")
        if self.vae is None:
            raise ValueError(f"{name}: pixel conditioning needs the checkpoint's tokenizer (root/vae/ or "
                             "Engine(vae=)); pass cond_latents tokens instead")
        T, h, w = self._shape(latents_shape)
        frames = _pixels.as_frames(image if image is not None else video, name, image=image is not None)
        _pixels.check_size(frames, name, (h, w), self.vae.spatial_stride)
        if batch is not None:
            _pixels.check_batch(frames, name, batch)
        if video is not None:
            n = _pixels.cond_frame_count(frames.shape[1], num_cond_frames, self.vae.temporal_stride)
            frames = frames[:, frames.shape[1] - n:]
        what = "num_cond_frames" if num_cond_frames is not None else name
        Tc = self.vae.latent_shape(*frames.shape[1:4])[0]
        if Tc > T:
            raise ValueError(f"{what}: {frames.shape[1]} frames encode to {Tc} latent frames, more than the {T} "
                             "generated (latents_shape)")
        codes = self.vae.encode_frames(frames)
        if codes.shape[1] > T:  # clips longer than the tokenizer's tile are encoded tile by tile
            raise ValueError(f"{what}: {frames.shape[1]} frames encode to {codes.shape[1]} latent frames (temporal "
                             f"tiles), more than the {T} generated (latents_shape)")
        return codes.to(self.device)

    def decode(self, tokens) -> np.ndarray:
        """uint8 frames (B, F, H, W, 3) of tokens (B, T, h, w) with the engine's tokenizer
        (``F = vae.num_frames(T)``: the authors' temporal tiling, see :mod:`ursa_engine.vae`)."""
        if self.vae is None:
            raise ValueError("tokens: decoding needs the checkpoint's tokenizer (root/vae/ or Engine(vae=))")
        return self.vae.decode_frames(tokens)

    def _timed_decode(self, tokens) -> tuple[np.ndarray, float, int | None]:
        """(frames, seconds, peak bytes on the tokenizer's CUDA device or None)."""
        dev = self.vae.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the steps' queued work is not decode time
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        frames = self.decode(tokens)  # ends with a copy to host: synchronizes
        seconds = time.perf_counter() - t0
        return frames, seconds, torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None

    def initial_tokens(self, batch: int, latents_shape, seed: int = 0) -> torch.Tensor:
        """x at t = 0: uniform codes (metric / mixture path) or the mask id, (B, T, H, W) int64."""
        T, H, W = self._shape(latents_shape)
        path = self.scheduler.path
        if isinstance(path, MaskPath):
            return torch.full((batch, T, H, W), path.mask_id, dtype=torch.long, device=self.device)
        seeds = self.sample_seeds(seed, batch)
        n = T * H * W
        words = random_words(seeds, n, batch * n, 0, TAG_INIT)[0]
        return to_below(words, path.size).view(batch, T, H, W)

    def sample_seeds(self, seed: int, batch: int) -> torch.Tensor:
        """Per-sample seeds ``seed + b`` (int64 on the engine's device)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"seed: expected an int in [0, 2^62), got {seed!r}")
        return torch.arange(batch, dtype=torch.int64, device=self.device) + seed

    @staticmethod
    def _shape(latents_shape) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in latents_shape)
        shape = (1, *shape) if len(shape) == 2 else shape
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"latents_shape: expected (T, H, W) or (H, W) of positive sizes, got {latents_shape}")
        return shape

    def scheduler_for(self, num_steps: int | None, shift: float | None, frames: int) -> Scheduler:
        """The engine's scheduler, or (cached) one with another step count / shift on the same path.

        Steps: ``num_steps``, else the engine's ``default_steps`` (an int, or ``"authors"``: 25 for
        images, 50 for video), else the scheduler's own.
        """
        s = self.scheduler
        if num_steps is None:
            num_steps = self.default_steps if isinstance(self.default_steps, int) else s.num_steps
            if self.default_steps == "authors":
                num_steps = 25 if frames == 1 else 50
        shift = s.shift if shift is None else float(shift)
        if num_steps == s.num_steps and shift == s.shift:
            return s
        key = (num_steps, shift)
        if key not in self._schedulers:
            self._schedulers[key] = Scheduler(s.path, num_steps, shift=shift, mask_sampler=s.mask_sampler,
                                              confidence_temperature=s.confidence_temperature)
        return self._schedulers[key]

    def _conditioning(self, cond_latents, cond_indices, B, shape, noise_scale, seeds):
        """(mask (T,) bool, values (B, T, H, W)) of the conditioning frames, noised if asked."""
        T, H, W = shape
        K = self.scheduler.path.size
        cond = torch.as_tensor(cond_latents, device=self.device)
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
            targets = [i % T if -T <= i < T else None for i in _as_index_list(cond_indices)]
            if None in targets or len(set(targets)) != len(targets):
                raise ValueError(f"cond_indices: expected distinct frame indices in [-{T}, {T}), got {cond_indices}")
            if Tc == len(targets):
                sources = list(range(Tc))  # the j-th given frame goes to frame cond_indices[j]
            elif Tc == T:
                sources = targets  # a full-length video: its frames at cond_indices are used (URSA)
            else:
                raise ValueError(f"cond_latents: {Tc} frames match neither len(cond_indices)={len(targets)} nor T={T}")
        values = torch.zeros(B, T, H, W, dtype=torch.long, device=self.device)
        values[:, targets] = cond[:, sources].long().expand(B, -1, -1, -1)
        mask = torch.zeros(T, dtype=torch.bool, device=self.device)
        mask[targets] = True
        if not 0.0 <= noise_scale <= 1.0:
            raise ValueError(f"cond_noise_scale: must be in [0, 1], got {noise_scale}")
        if noise_scale > 0:  # resample the given frames from p_t(. | cond) at t = 1 − scale (§2.4)
            values = self.scheduler.path.sample(values, 1.0 - noise_scale, seed=seeds)
        return mask, values

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt_ids, negative_prompt_ids=None, latents_shape=(1, 40, 64), *,
                 guidance_scale: float = 7.0, guidance_trunc: float = 0.9, num_steps: int | None = None,
                 shift: float | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 argmax_last: bool = False, seed: int = 0, motion: float | None = None, cond_latents=None,
                 cond_indices=None, cond_noise_scale: float = 0.0, freeze_cond: bool = False,
                 latents: torch.Tensor | None = None, progress: bool = False, mode: str | None = None,
                 image=None, video=None, num_cond_frames: int | None = None, decode: bool = True,
                 prompt_length: int | None = None) -> GenerationResult:
        """Generate latent tokens (and, with a tokenizer, pixels) for a batch of prompts (DESIGN §2.4, §4, §8).

        Parameters
        ----------
        prompt_ids : (B, P) ids, a list of id lists, or text (str / list of str, needs a tokenizer);
            left-padded / truncated to ``prompt_length``
        negative_prompt_ids : the unconditional prompt(s), 1 or B of them (default: the empty prompt,
            all pads); only used when guidance is on
        latents_shape : (T, H, W) or (H, W)
        guidance_scale, guidance_trunc : CFG ``z = u + s(c − u)`` while ``t_k < guidance_trunc``
        num_steps, shift : override the scheduler's
        temperature, top_k, top_p, argmax_last : sampling options of :meth:`Scheduler.step`
        seed : sample ``b`` uses ``seed + b``
        motion : the ``motion=X, `` prefix for text prompts of video checkpoints
        cond_latents, cond_indices : known frames (B or 1, Tc, H, W); with ``cond_indices`` the j-th
            frame goes to frame ``cond_indices[j]`` (or, when Tc == T, frames ``cond_indices`` of a
            full-length video are used); without, they fill frames 0..Tc−1
        cond_noise_scale : given frames are resampled from the path at ``t = 1 − cond_noise_scale``
        freeze_cond : keep the given (possibly noised) frames fixed instead of stepping them
        latents : (B, T, H, W) initial tokens instead of the seeded noise
        progress : a tqdm bar over the steps
        mode : override the engine's ``mode``
        image : uint8 (H, W, 3) / PIL image / (B, H, W, 3), encoded by the tokenizer into conditioning
            frame 0 (image-to-video; the authors' ``latents[:, :1] = cond``); with ``cond_indices``
            into the frame(s) listed there. Needs a tokenizer; pixels must be ``H·s × W·s``
        video : uint8 (F, H, W, 3) or (B, F, H, W, 3): its last ``num_cond_frames`` frames (default
            all; 1 + 4k for the video tokenizer) are encoded into the first Tc latent frames
            (video extension). ``cond_noise_scale``, ``freeze_cond`` apply as for ``cond_latents``
        decode : decode the tokens into ``frames`` when the engine has a tokenizer (default True)
        prompt_length : override the engine's prompt length for this call

        Returns
        -------
        GenerationResult with ``tokens`` (B, T, H, W) and, with a tokenizer, ``frames``
        (B, F, H·s, W·s, 3) uint8. Decoding runs after the step loop and is timed apart
        (``decode_time``; not in ``step_times``). While it runs, what stays resident is the weights,
        the tokens and, in graph mode, the captured graphs' private memory pool (the static logits and
        activations of one step, kept for the next call with the same layout; :meth:`release_graphs`
        frees it). The loop's own logits and activations live only inside a step and are freed
        before decoding.
        """
        t_start = time.perf_counter()
        cfg, device = self.model.config, self.device
        _validate.positive("temperature", temperature)  # before anything runs (the sampler checks too late)
        _validate.filtering(top_k, top_p, self.scheduler.path.size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        shape = self._shape(latents_shape)
        n = math.prod(shape)
        cond = self.encode_prompts(prompt_ids, motion=motion, length=prompt_length)
        B = cond.shape[0]
        guidance_scale, guidance_trunc = float(guidance_scale), float(guidance_trunc)
        if not math.isfinite(guidance_scale) or not math.isfinite(guidance_trunc):
            raise ValueError(f"guidance_scale / guidance_trunc: must be finite, got {guidance_scale}, {guidance_trunc}")
        sched = self.scheduler_for(num_steps, shift, shape[0])
        N = sched.num_steps
        guided = [guidance_scale != 1.0 and float(sched.times[k]) < guidance_trunc for k in range(N)]
        skip_first = isinstance(sched.path, MetricPath) and N > 1
        if skip_first:
            guided[0] = False
        use_cfg = any(guided)
        ids_rows = [cond]
        if use_cfg:
            neg = negative_prompt_ids if negative_prompt_ids is not None else [[]]
            neg = self.encode_prompts(neg, name="negative_prompt_ids", length=cond.shape[1])
            if neg.shape[0] not in (1, B):
                raise ValueError(f"negative_prompt_ids: expected 1 or {B} prompts, got {neg.shape[0]}")
            ids_rows.append(neg.expand(B, -1))
        seeds = self.sample_seeds(seed, B)
        if latents is None:
            x = self.initial_tokens(B, shape, seed)
        else:
            x = torch.as_tensor(latents, device=device)
            if tuple(x.shape) != (B, *shape) or x.is_floating_point():
                raise ValueError(f"latents: expected integer tokens of shape {(B, *shape)}, got {tuple(x.shape)}")
            if x.min() < 0 or x.max() >= sched.path.size:
                raise ValueError(f"latents: tokens must lie in [0, {sched.path.size})")
            x = x.long().clone()
        if image is not None or video is not None:
            if cond_latents is not None:
                raise ValueError("cond_latents: give conditioning as tokens (cond_latents) or as pixels (image= / "
                                 "video=), not both")
            cond_latents = self.encode_condition(image=image, video=video, latents_shape=shape,
                                                 num_cond_frames=num_cond_frames, batch=B)
        elif num_cond_frames is not None:
            raise ValueError("num_cond_frames: applies to video= only")
        freeze = None
        if cond_latents is not None:
            mask, values = self._conditioning(cond_latents, cond_indices, B, shape, float(cond_noise_scale), seeds)
            x = torch.where(mask[None, :, None, None], values, x)
            if freeze_cond:
                freeze = (mask[:, None, None].expand(shape).reshape(1, n), values.reshape(B, n))
        elif cond_indices is not None:
            raise ValueError("cond_indices: given without cond_latents")
        x = x.reshape(B, n).contiguous()
        P = cond.shape[1]
        ids = sequence_ids(torch.cat(ids_rows), x.repeat(len(ids_rows), 1), cfg)  # (B or 2B, P + 1 + n)
        rope = self.model.rope_tables(latent_positions(P, shape, device=device))
        opts = {"guidance_scale": guidance_scale, "guidance_trunc": guidance_trunc, "temperature": temperature,
                    "top_k": top_k, "top_p": top_p}
        mode = self._resolve_mode(mode or self.mode, sched)
        state = _LoopState(self, sched, ids, x, rope, seeds, freeze, opts, argmax_last, n, B)
        state.backend = self._sampler_backend(state, 2 * B if use_cfg else B)  # same in eager and graph
        runner = self._graph_runner(state) if mode == "graph" else None
        times, calls = [], 0
        timer = _StepTimer(device)
        for k in tqdm(range(N), disable=not progress, desc="denoising", unit="step"):
            timer.start()
            if not (skip_first and k == 0):
                rows = 2 * B if guided[k] else B
                if runner is not None and k < N - 1:
                    runner.replay(k, rows)
                else:
                    state.body(k, rows)
                calls += 1
            times.append(timer.stop())
        result = GenerationResult(
            tokens=state.x.view(B, *shape).clone(), step_times=timer.resolve(times),
            peak_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            model_calls=calls, guided_steps=sum(guided), mode=mode, attention=_attention_name(self.model, device))
        del state, runner, ids, rope  # the loop's buffers (a cached graph runner keeps its own)
        if decode and self.vae is not None:
            result.frames, result.decode_time, result.decode_peak_memory = self._timed_decode(result.tokens)
        result.total_time = time.perf_counter() - t_start
        return result

    def _resolve_mode(self, mode: str, sched: Scheduler) -> str:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        graphable = self.device.type == "cuda" and sched.mask_sampler != "confidence"
        if mode == "graph" and not graphable:
            why = "a CUDA device" if self.device.type != "cuda" else "a sampler that takes tensor step indices"
            raise RuntimeError(f"mode='graph' needs {why} "
                               f"(model on {self.device}, mask_sampler={sched.mask_sampler!r})")
        return "graph" if mode == "graph" or (mode == "auto" and graphable) else "eager"

    def _sampler_backend(self, state: _LoopState, rows: int) -> str:
        """The one concrete sampler backend of a generation, for eager and graph steps alike.

        ``"auto"`` where a fused sampler can run is resolved by :meth:`Scheduler.tune` (it times
        Triton and native on this layout; synchronizes, so it runs here, before the loop and
        outside any capture), once per layout; the choice is remembered.
        """
        if self.sampler_backend != "auto" or not _tunable(state):
            return self.sampler_backend
        o = state.opts
        key = (id(state.sched), tuple(state.x.shape), rows, o["top_k"], o["top_p"])
        if key not in self._tuned:
            B = state.B
            logits = self.model(state.ids[:rows], rope=state.rope, latent_tokens=state.n)
            chosen = state.sched.tune(logits[:B], state.x, uncond_logits=logits[B:] if rows > B else None,
                                      seed=state.seeds, argmax_last=state.argmax_last, **o)
            self._tuned[key] = chosen or "auto"
        return self._tuned[key]

    def _graph_runner(self, state: _LoopState) -> _GraphRunner:
        key = state.graph_key()
        runner = self._graphs.get(key)
        if runner is None:
            self._graphs.clear()  # one cached layout at a time: graphs hold their memory pools
            runner = self._graphs[key] = _GraphRunner(state)
        else:
            runner.load(state)
        return runner

    # ------------------------------------------------------------------ long videos
    def extrapolate(self, prompt_ids, *, num_windows: int, latents_shape=(13, 40, 64), video=None,
                    history_frames: int = 4, history_t: float = 0.9, seed: int = 0, decode: bool = True,
                    **kwargs) -> GenerationResult:
        """Long video by a sliding window (paper appendix E, DESIGN §2.4).

        Each new window of ``T`` latent frames is conditioned on the newest ``history_frames``
        latent frames generated so far, resampled from the path at ``t = history_t`` (0.9), and
        contributes its ``T − history_frames`` new frames. The paper's "most recent 13 frames"
        are pixel frames: (13 − 1)/4 + 1 = 4 latent frames, so a 49-frame window adds 36 pixel
        frames (49 + 12·36 = 481, its Figure 7).

        Parameters
        ----------
        num_windows : windows generated after the first one
        video : what to extend: (B, T0, H, W) integer tokens, or (with a tokenizer) uint8 pixels
            (F, H·s, W·s, 3) / (B, F, H·s, W·s, 3) of which the last ``1 + s·(history_frames − 1)``
            frames (13 for the video tokenizer) are encoded, as the authors' README loop does with
            ``video[-num_cond_frames:]``; default: a first window generated from the prompt (from
            ``image=`` too, when given)
        decode : with a tokenizer, return ``frames`` (default True)
        kwargs : forwarded to :meth:`generate` (guidance, steps, motion, ...)

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
        T, H, W = self._shape(latents_shape)
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
        B = self.encode_prompts(prompt_ids, motion=kwargs.get("motion"), length=kwargs.get("prompt_length")).shape[0]
        pixels = None
        if video is not None and _pixels.is_pixels(video):
            if self.vae is None:
                raise ValueError("video: pixel frames need the checkpoint's tokenizer (root/vae/ or Engine(vae=)); "
                                 "pass tokens instead")
            pixels = _pixels.as_frames(video, "video", image=False)
            need = (history_frames - 1) * self.vae.temporal_stride + 1
            if pixels.shape[1] < need:
                raise ValueError(f"video: {pixels.shape[1]} frames, fewer than the {need} pixel frames of "
                                 f"history_frames={history_frames}")
            video = self.encode_condition(video=pixels, latents_shape=(T, H, W), num_cond_frames=need, batch=B)
        results = []
        if video is None:
            results.append(self.generate(prompt_ids, latents_shape=(T, H, W), seed=seed, image=image, decode=False,
                                         **kwargs))
            video = results[0].tokens
        video = torch.as_tensor(video, device=self.device)
        if video.is_floating_point() or video.is_complex():
            raise TypeError(f"video: expected integer tokens or uint8 pixels (..., 3), got {video.dtype}")
        if video.dim() != 4 or tuple(video.shape[2:]) != (H, W) or video.shape[1] < history_frames:
            raise ValueError(f"video: expected (B, >= {history_frames}, {H}, {W}) tokens, got {tuple(video.shape)}")
        if video.shape[0] not in (1, B):
            raise ValueError(f"video: a batch of {video.shape[0]}, but there are {B} prompts (expected 1 or {B})")
        given, windows = video, []
        for w in range(1, num_windows + 1):
            r = self.generate(prompt_ids, latents_shape=(T, H, W), seed=seed + (w << 32), decode=False,
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
        if decode and self.vae is not None:
            skip = self.vae.num_frames(history_frames)
            parts, peaks = [], []
            for i, tokens in enumerate([None if pixels is not None else given, *windows]):
                if tokens is None:
                    parts.append(pixels.cpu().numpy())
                    continue
                frames, seconds, peak = self._timed_decode(tokens)
                parts.append(frames if i == 0 else frames[:, skip:])
                out.decode_time += seconds
                peaks.append(peak)
            n = max(p.shape[0] for p in parts)
            out.frames = np.concatenate([np.broadcast_to(p, (n, *p.shape[1:])) for p in parts], 1)
            out.decode_peak_memory = max(peaks) if peaks and peaks[0] is not None else None
        out.total_time = time.perf_counter() - t_start
        return out


def _attention_name(model: URSATransformer, device: torch.device) -> str:
    from .attention import resolve_attention

    return resolve_attention(model.attn_backend, device, model.dtype, model.config.head_dim)


class _StepTimer:
    """Per-step wall time: CUDA events (read once at the end, no sync per step) or perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events = []

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.events[-1][1].record()
            return 0.0
        return time.perf_counter() - self._t0

    def resolve(self, times: list[float]) -> list[float]:
        if not self.cuda:
            return times
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in self.events]


class _LoopState:
    """The buffers of one generation: ids (rows, L), tokens x (B, n), and one eager step."""

    def __init__(self, engine, sched, ids, x, rope, seeds, freeze, opts, argmax_last, n, B):
        self.engine, self.sched, self.ids, self.x, self.rope = engine, sched, ids, x, rope
        self.seeds, self.freeze, self.opts, self.argmax_last, self.n, self.B = seeds, freeze, opts, argmax_last, n, B
        self.x_next = torch.empty_like(x)
        self.shift = engine.model.config.lm_vocab_size
        self.backend = engine.sampler_backend  # the concrete one: set by Engine._sampler_backend

    def graph_key(self):
        o = self.opts
        return (id(self.sched), tuple(self.ids.shape), self.n, self.B, self.freeze is not None, o["guidance_scale"],
                o["temperature"], o["top_k"], o["top_p"], self.backend, self.engine.model.attn_backend,
                self.engine.model.ops_backend, self.engine.model.dtype)

    def body(self, k, rows: int) -> None:
        """Transformer on ``rows`` rows, sampler step, tokens written back: one whole step."""
        B = self.B
        logits = self.engine.model(self.ids[:rows], rope=self.rope, latent_tokens=self.n)  # (rows, n, K)
        graph = isinstance(k, torch.Tensor)
        self.sched.step(logits[:B], k, self.x, uncond_logits=logits[B:] if rows > B else None,
                        argmax_last=self.argmax_last, seed=self.seeds, backend=self.backend,
                        validate=self.engine.validate_steps and not graph, out=self.x_next, **self.opts)
        if self.freeze is not None:
            mask, values = self.freeze
            torch.where(mask, values, self.x_next, out=self.x_next)
        self.x.copy_(self.x_next)
        for r in range(self.ids.shape[0] // B):  # every half sees the new tokens
            torch.add(self.x, self.shift, out=self.ids[r * B : (r + 1) * B, -self.n :])


def _tunable(state: _LoopState) -> bool:
    """Whether :meth:`Scheduler.tune` can pick a fused sampler here (a GPU, tensor-step sampler)."""
    return state.x.is_cuda and state.sched.mask_sampler != "confidence"


def _cuda_graph_capture(fn, pool):
    """Warm ``fn`` up on a side stream (Triton compilation, cuDNN plans), capture it into a CUDA
    graph drawing on ``pool``; return the replay callable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


class _GraphRunner:
    """CUDA graphs of :meth:`_LoopState.body` for 2B and B rows, sharing one memory pool.

    The pool is shared safely: every value that outlives a replay (ids, x, seeds, rope tables, the
    frozen frames) is a static buffer allocated outside the graphs, and replays never overlap.
    """

    def __init__(self, state: _LoopState):
        self.state = state
        self.k = torch.zeros((), dtype=torch.int64, device=state.x.device)
        self.pool = torch.cuda.graph_pool_handle() if state.x.is_cuda else None
        self.graphs: dict[int, object] = {}

    def load(self, state: _LoopState) -> None:
        """Reuse the captured graphs for a new generation with the same layout: copy its inputs in."""
        s = self.state
        s.ids.copy_(state.ids)
        s.x.copy_(state.x)
        s.seeds.copy_(state.seeds)
        s.rope[0].copy_(state.rope[0])  # same token count, maybe another (T, H, W): new 3D positions
        s.rope[1].copy_(state.rope[1])
        if s.freeze is not None:
            s.freeze[0].copy_(state.freeze[0])
            s.freeze[1].copy_(state.freeze[1])
        state.ids, state.x, state.seeds, state.freeze, state.x_next = s.ids, s.x, s.seeds, s.freeze, s.x_next
        state.rope = s.rope

    def _capture(self, rows: int):
        s = self.state  # its sampler backend was resolved (tuned) before the loop, as in eager mode
        saved = (s.ids.clone(), s.x.clone())
        self.k.fill_(0)
        replay = _cuda_graph_capture(lambda: s.body(self.k, rows), self.pool)
        s.ids.copy_(saved[0])  # the warm-up steps changed the state; capture itself ran nothing
        s.x.copy_(saved[1])
        return replay

    def replay(self, k: int, rows: int) -> None:
        replay = self.graphs.get(rows)
        if replay is None:
            replay = self.graphs[rows] = self._capture(rows)
        self.k.fill_(k)  # per-step values are read from device memory by the captured sampler
        replay()
