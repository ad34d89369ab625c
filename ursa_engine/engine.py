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

CUDA graphs (``mode="graph"``): the body of a step is captured once per batch layout and replayed
with the step index in device memory (:mod:`ursa_engine.graphs`); replays produce the eager tokens.
The last step (k = N − 1) runs eagerly (the scheduler takes it as a python int).

Memory (issue 11): the (rows, n, K) logits never exist at once. The head and the sampler run in
token ranges whose logits fit ``logits_budget`` (tokens equal to the unchunked step: every draw is
keyed by token, §2.5); on a GPU ``head="auto"`` draws x̂1 inside the ``lm_head`` GEMM (the fused
head, ``ursa_engine.triton_kernels.head_draw``) and never writes logits; the transformer runs its MLP in
sequence chunks (``URSATransformer.activation_budget``). :func:`ursa_engine.memory.plan_generation`
computes the resulting peak on the CPU.

Beside this module: :mod:`ursa_engine.conditioning` (``image=`` / ``video=`` / ``cond_latents``,
long videos), :mod:`ursa_engine.results` (:class:`GenerationResult`, step and decode timing).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from tqdm import tqdm

from . import _dispatch, _validate, conditioning, ops_library
from .attention import ATTENTION_BACKENDS, resolve_attention
from .graphs import GraphRunner, LoopState
from .inputs import prepare_inputs
from .model import URSATransformer, latent_positions, sequence_ids
from .model_ops import MODEL_OP_BACKENDS
from .paths import MaskPath
from .reference.rng import TAG_INIT, random_words, to_below
from .results import GenerationResult, StepTimer, timed_decode
from .scheduler import Scheduler
from .tokenizer import PROMPT_LENGTH, PromptTokenizer, pad_prompt_ids
from .trajectory import TrajectoryRecorder

__all__ = ["Engine", "GenerationResult", "MODES", "NEGATIVE_PROMPT", "SAMPLER_BACKENDS"]

SAMPLER_BACKENDS = ("auto", *_dispatch.BACKENDS)
NEGATIVE_PROMPT = "worst quality, low quality, inconsistent motion, static, still, blurry, jittery, distorted, ugly"
MODES = ("auto", "eager", "graph")
HEADS = ("auto", "fused", "chunked")
LOGITS_BUDGET = 512 * 2**20  # bytes of one range of logits (rows × tokens × K) in the head + sampler


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
    head : how x̂1 is drawn from the hidden states: ``"chunked"`` (``lm_head`` on one token range at a
        time, then the sampler reads that range's logits), ``"fused"`` (``ursa_engine.triton_kernels.head_draw``:
        the draw inside the ``lm_head`` GEMM, logits never written; the metric and mixture paths
        without top-k / top-p) or ``"auto"`` (fused where it can run on a CUDA device and the
        sampler backend is ``"auto"`` / ``"triton"``, else chunked). Tokens are the same either way
        up to the float ties of §2.5
    logits_budget : bytes of one token range's logits (all rows); None: one range (the whole
        (rows, n, K) logits, as before issue 11)
    mesh : several processes (issue 13): a ``"dp=2,cfg=2,sp=2"`` layout (under torchrun), a
        ``DeviceMesh`` with dims dp / cfg / sp, or ``ursa_engine.distributed.Groups``; ``generate``
        then runs :mod:`ursa_engine.distributed.generate` (same tokens as one process)
    """

    def __init__(self, model: URSATransformer, scheduler: Scheduler, *, tokenizer: PromptTokenizer | None = None,
                 mode: str = "auto", attn_backend: str | None = None, ops_backend: str | None = None,
                 sampler_backend: str = "auto", prompt_length: int = PROMPT_LENGTH,
                 default_steps: int | str | None = None, validate_steps: bool = False, vae=None,
                 head: str = "auto", logits_budget: int | None = LOGITS_BUDGET, mesh=None):
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
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        if logits_budget is not None and (isinstance(logits_budget, bool) or not isinstance(logits_budget, int)
                                          or logits_budget < 1):
            raise ValueError(f"logits_budget: expected a positive number of bytes or None, got {logits_budget!r}")
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
        self.head, self.logits_budget = head, logits_budget
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
        self.parallel = None  # ursa_engine.distributed.Groups of a mesh of several processes (issue 13)
        if mesh is not None:
            from .distributed import groups_for
            self.parallel = groups_for(mesh, model.config, device=self.device)  # cuda:LOCAL_RANK or the CPU

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, root: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                        num_steps: int | None = None, shift: float | None = None, variant: str | None = None,
                        load_vae: bool = True, transformer_weights: str | os.PathLike | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, token: str | bool | None = None,
                        **options) -> Engine:
        """Load ``root/transformer``, ``root/scheduler`` (codebook, alpha, c, shift) and, when
        present, ``root/tokenizer`` (prompts) and ``root/vae`` (pixels, :func:`ursa_engine.vae.load_tokenizer`,
        in the engine's dtype and on its device). A given ``shift`` overrides the checkpoint's; without
        ``num_steps`` generation takes the authors' defaults (25 steps for images, 50 for video).
        ``variant`` picks ``*.<variant>.safetensors`` weights (transformer and vae); ``load_vae=False``
        skips the vae (tokens only).

        ``root`` is a local folder or a hub id ``org/name`` (:func:`ursa_engine.hub.resolve_root`:
        ``revision``, ``cache_dir``, ``local_files_only``, ``token``; only the files read are
        downloaded). ``transformer_weights`` lays a transformer-only state dict (``.safetensors`` /
        ``.bin`` / ``.pt`` / ``.pth`` file or folder, e.g. a fine-tuned ``diffusion_pytorch_model.bin``)
        over ``root/transformer``: its ``config.json`` is kept, its weights are not read
        (:func:`ursa_engine.checkpoint.read_weights`, DESIGN §9).
        """
        from .pretrained import load_engine

        return load_engine(cls, root, dtype=dtype, device=device, num_steps=num_steps, shift=shift, variant=variant,
                           load_vae=load_vae, transformer_weights=transformer_weights, revision=revision,
                           cache_dir=cache_dir, local_files_only=local_files_only, token=token, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> Engine:
        """Move (and optionally cast) the transformer and the vae; captured graphs are dropped."""
        self.release_graphs()
        self._tuned.clear()
        self.model.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and their memory pool (kept between calls by design)."""
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ LoRA adapters (DESIGN §9)
    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Merge a PEFT LoRA adapter into the transformer's weights (no per-step cost).

        Several adapters may be loaded, each with its scale: the weights become
        ``round(W + Σᵢ sᵢ·γᵢ·Bᵢ Aᵢ)`` (fp32 sum, one rounding; :mod:`ursa_engine.adapters`). Weights
        are written in place, so cached CUDA graphs stay valid and replay the merged model.

        Parameters
        ----------
        path : an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)
            or a :class:`ursa_engine.adapters.LoRAWeights`
        scale : s (1.0: the adapter as trained)
        name : its name for :meth:`unload_lora` (default: the folder's name)

        Returns
        -------
        the adapter's name
        """
        from .adapters import MergedAdapters

        if getattr(self, "_merged_loras", None) is None:
            self._merged_loras = MergedAdapters(self.model)
        return self._merged_loras.load(path, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Unmerge one adapter (``None``: every one); with none left the weights are the base ones, bit for bit."""
        merged = getattr(self, "_merged_loras", None)
        if merged is None or not merged.loaded:
            if name is not None:
                raise ValueError(f"name: no adapter {name!r} is loaded (loaded: none)")
            return
        merged.unload(name)

    @property
    def loras(self) -> dict[str, float]:
        """The merged adapters: name -> scale, in load order."""
        merged = getattr(self, "_merged_loras", None)
        return {} if merged is None else {n: s for n, (_, s) in merged.loaded.items()}

    # ------------------------------------------------------------------ inputs
    def encode_prompts(self, prompts, *, motion: float | None = None, name: str = "prompt_ids",
                       length: int | None = None) -> torch.Tensor:
        """(B, length) ids from strings (needs the tokenizer), id lists or an id tensor; ``length``
        defaults to the engine's ``prompt_length``."""
        length = self.prompt_length if length is None else _validate.prompt_length(length)
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
        try:
            ids = pad_prompt_ids(prompts, pad, length)
        except (TypeError, ValueError) as err:  # its messages say "prompt ids": name the argument instead
            raise type(err)(f"{name}: {str(err).removeprefix('prompt ids: ')}") from None
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
        codes = conditioning.encode_pixels(self.vae, image=image, video=video, latents_shape=latents_shape,
                                           num_cond_frames=num_cond_frames, batch=batch)
        return codes.to(self.device)

    def encode_inpaint(self, image, keep, latents_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(known_tokens (1, T, h, w), known_mask (T, h, w))`` for :meth:`generate` from an image
        (uint8 (H, W, 3) / PIL) and ``keep`` bool (H, W) of kept pixels: a token is known iff its whole
        patch is kept; the image is latent frame 0 (:func:`ursa_engine.conditioning.encode_inpaint`)."""
        tokens, mask = conditioning.encode_inpaint(self.vae, image, keep, latents_shape)
        return tokens.to(self.device), mask.to(self.device)

    def decode(self, tokens) -> np.ndarray:
        """uint8 frames (B, F, H, W, 3) of tokens (B, T, h, w) with the engine's tokenizer
        (``F = vae.num_frames(T)``: the authors' temporal tiling, see :mod:`ursa_engine.vae`)."""
        if self.vae is None:
            raise ValueError("tokens: decoding needs the checkpoint's tokenizer (root/vae/ or Engine(vae=))")
        return self.vae.decode_frames(tokens)

    def initial_tokens(self, batch: int, latents_shape, seed: int = 0) -> torch.Tensor:
        """x at t = 0: uniform codes (metric / mixture path) or the mask id, (B, T, H, W) int64."""
        T, H, W = _validate.latents_shape(latents_shape)
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

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    @ops_library.on_own_device  # kernels, CUDA events, tuning and graph capture on the engine's device (issue 12)
    def generate(self, prompt_ids, negative_prompt_ids=None, latents_shape=(1, 40, 64), *,
                 guidance_scale: float = 7.0, guidance_trunc: float = 0.9, num_steps: int | None = None,
                 shift: float | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 argmax_last: bool = False, seed: int = 0, motion: float | None = None, cond_latents=None,
                 cond_indices=None, cond_noise_scale: float = 0.0, freeze_cond: bool = False,
                 latents: torch.Tensor | None = None, progress: bool = False, mode: str | None = None,
                 image=None, video=None, num_cond_frames: int | None = None, decode: bool = True,
                 keep_graphs: bool | None = None, prompt_length: int | None = None,
                 return_trajectory: bool = False, known_tokens=None, known_mask=None) -> GenerationResult:
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
        keep_graphs : keep the captured CUDA graphs (and their private memory pool) after the call.
            Default: kept, except when the call decodes: the pool holds one step's working set,
            which ordinary allocations cannot reuse, so the decode would add to the step's peak;
            it is freed first and the next call captures again (two warm-up steps and a capture).
            Pass True to keep graphs anyway (a serving loop, memory to spare)
        prompt_length : override the engine's prompt length for this call
        return_trajectory : record every model call's state, x̂1, their log-probabilities and the
            transition's (``result.trajectory``, a :class:`ursa_engine.trajectory.Trajectory`; RL
            rollouts, DESIGN §9). Steps then run eagerly (``mode="graph"`` is refused) with the
            transformer's norm / RoPE / SwiGLU on their torch twins (what a replay differentiates);
            tokens are those of an unrecorded run (on a GPU up to §2.5's float ties). Not for the
            confidence sampler or a mesh
        known_tokens, known_mask : inpainting at the token level (DESIGN §2.4): ``known_mask`` bool
            (T, H, W) or (1, T, H, W) (0/1 integers accepted; one region for the whole batch) marks
            the tokens that start at and hold ``known_tokens`` (B or 1, T, H, W) or (T, H, W) codes
            after every step, on every backend, in graphs, under CFG and on a mesh; codes under the
            mask must lie in [0, K). Frozen with the ``freeze_cond`` frames (the union; known tokens
            win where both give one); recorded as frozen in a trajectory. An empty mask is a plain
            generation; a full one returns ``known_tokens``. From pixels: :meth:`encode_inpaint`

        Returns
        -------
        GenerationResult with ``tokens`` (B, T, H, W) and, with a tokenizer, ``frames``
        (B, F, H·s, W·s, 3) uint8. Decoding runs after the step loop and is timed apart
        (``decode_time``; not in ``step_times``). While it runs, what stays resident is the weights
        and the tokens (and the graphs' memory pool with ``keep_graphs=True``): the loop's logits and
        activations are freed before decoding, so the decode does not set the generation's peak.
        """
        if return_trajectory:
            _check_recordable(self, mode, num_steps)
        if self.parallel is not None:  # a mesh of several processes: ursa_engine.distributed (issue 13)
            args = {k: v for k, v in locals().items() if k not in ("self", "return_trajectory")}
            from .distributed.generate import generate as parallel_generate

            return parallel_generate(self, self.parallel, **args)
        t_start = time.perf_counter()
        cfg, device = self.model.config, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        inp = prepare_inputs(
            self, prompt_ids, negative_prompt_ids, latents_shape, guidance_scale=guidance_scale,
            guidance_trunc=guidance_trunc, num_steps=num_steps, shift=shift, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, motion=motion, cond_latents=cond_latents, cond_indices=cond_indices,
            cond_noise_scale=cond_noise_scale, freeze_cond=freeze_cond, latents=latents, image=image, video=video,
            num_cond_frames=num_cond_frames, prompt_length=prompt_length, known_tokens=known_tokens,
            known_mask=known_mask)
        sched, guided, skip_first, shape, n, B = inp.sched, inp.guided, inp.skip_first, inp.shape, inp.n, inp.B
        N, cond, x, seeds, freeze, opts = sched.num_steps, inp.cond, inp.x, inp.seeds, inp.freeze, inp.opts
        use_cfg = inp.use_cfg
        ids_rows = [cond] if inp.neg is None else [cond, inp.neg]
        P = cond.shape[1]
        ids = sequence_ids(torch.cat(ids_rows), x.repeat(len(ids_rows), 1), cfg)  # (B or 2B, P + 1 + n)
        rope = self.model.rope_tables(latent_positions(P, shape, device=device))
        mode = "eager" if return_trajectory else self._resolve_mode(mode or self.mode, sched)
        state = LoopState(self, sched, ids, x, rope, seeds, freeze, opts, argmax_last, n, B)
        self.configure(state, 2 * B if use_cfg else B)
        if return_trajectory:
            state.recorder = TrajectoryRecorder(B, n, device)
            state.ops_backend = "torch"  # the differentiable norm / RoPE / SwiGLU the replay runs (no mismatch)
        runner = self._graph_runner(state) if mode == "graph" else None
        times, calls = [], 0
        timer = StepTimer(device)
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
        if return_trajectory:
            result.trajectory = state.recorder.finish(
                shape, seeds=seeds, prompt_ids=cond, negative_prompt_ids=inp.neg, scheduler=sched,
                options=dict(opts, argmax_last=argmax_last), frozen=None if freeze is None else freeze[0])
        del state, runner, ids, rope  # the loop's buffers (a cached graph runner keeps its own)
        decoding = decode and self.vae is not None
        if self._graphs and not (keep_graphs if keep_graphs is not None else not decoding):
            self.release_graphs()  # the pool's memory goes back to the allocator for the decode
        if decoding:
            result.frames, result.decode_time, result.decode_peak_memory = timed_decode(self.decode, self.vae.device,
                                                                                         result.tokens)
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

    def configure(self, state: LoopState, rows: int) -> None:
        """Decide, before the loop, how every step of ``state`` draws: the fused head or not, and
        the concrete sampler backend (the same in eager and graph steps). ``rows``: the widest
        layout (2B with guidance)."""
        state.fused_head = self._fused_head(state)
        state.backend = self._sampler_backend(state, rows)

    def _fused_head(self, state: LoopState) -> bool:
        """Whether x̂1 comes from the fused head kernel (``head``, see the class docstring)."""
        if self.head == "chunked":
            return False
        sched, o = state.sched, state.opts
        why = None
        if sched.mask_sampler == "confidence":
            why = "the confidence sampler ranks whole samples (it needs the logits)"
        elif isinstance(sched.path, MaskPath):
            why = "the masked path never draws the mask id, which the fused head cannot exclude"
        elif o["top_k"] or o["top_p"] < 1.0:
            why = "top-k / top-p filtering needs the logits"
        else:
            why = ops_library.head_draw_unavailable(self.device)
        if self.head == "fused":
            if why is not None:
                raise RuntimeError(f"head='fused' cannot run here: {why}")
            return True
        gpu = self.device.type == "cuda" or ops_library.gpu_planning()
        return why is None and gpu and self.sampler_backend in ("auto", "triton")

    def _sampler_backend(self, state: LoopState, rows: int) -> str:
        """The one concrete sampler backend of a generation, for eager and graph steps alike.

        ``"auto"`` where a fused sampler can run is resolved by :meth:`Scheduler.tune` (it times
        Triton and native on one token range of this layout, the shape every step then runs;
        synchronizes, so it runs here, before the loop and outside any capture), once per layout;
        the choice is remembered. Steps fed by the fused head read no logits: nothing to tune.
        """
        if self.sampler_backend != "auto" or state.fused_head or not _tunable(state):
            return self.sampler_backend
        o = state.opts
        s, e = state.chunks(rows)[0]
        key = (id(state.sched), tuple(state.x.shape), rows, e - s, o["top_k"], o["top_p"])
        if key not in self._tuned:
            B = state.B
            hidden = self.model.hidden_states(state.ids[:rows], rope=state.rope, latent_tokens=state.n)
            logits = self.model.lm_head(hidden[:, s:e])
            chosen = state.sched.tune(logits[:B], state.x[:, s:e].contiguous(),
                                      uncond_logits=logits[B:] if rows > B else None, seed=state.seeds,
                                      argmax_last=state.argmax_last, **o)
            self._tuned[key] = chosen or "auto"
        return self._tuned[key]

    def _graph_runner(self, state: LoopState) -> GraphRunner:
        key = state.graph_key()
        runner = self._graphs.get(key)
        if runner is None:
            self._graphs.clear()  # one cached layout at a time: graphs hold their memory pools
            runner = self._graphs[key] = GraphRunner(state)
        else:
            runner.load(state)
        return runner

    # ------------------------------------------------------------------ long videos
    def extrapolate(self, prompt_ids, *, num_windows: int, latents_shape=(13, 40, 64), video=None,
                    history_frames: int = 4, history_t: float = 0.9, seed: int = 0, decode: bool = True,
                    **kwargs) -> GenerationResult:
        """Long video by a sliding window (paper appendix E, DESIGN §2.4): each window of ``T`` latent
        frames is conditioned on the newest ``history_frames`` latent frames so far (resampled at
        ``t = history_t``) and adds its ``T − history_frames`` new frames; ``kwargs`` go to
        :meth:`generate`. Parameters, result and how windows are decoded:
        :func:`ursa_engine.conditioning.extrapolate`.
        """
        return conditioning.extrapolate(self, prompt_ids, num_windows=num_windows, latents_shape=latents_shape,
                                        video=video, history_frames=history_frames, history_t=history_t, seed=seed,
                                        decode=decode, **kwargs)


def _check_recordable(engine: Engine, mode: str | None, num_steps) -> None:
    """``return_trajectory`` runs eager steps of a per-token sampler in one process (issue 18)."""
    if mode == "graph" or (mode is None and engine.mode == "graph"):
        raise ValueError("return_trajectory: recording runs eager steps; pass mode='eager' or 'auto'")
    if engine.parallel is not None:
        raise ValueError("return_trajectory: not supported on a mesh of several processes (record on one)")
    if engine.scheduler_for(num_steps, None, 1).mask_sampler == "confidence":
        raise ValueError("return_trajectory: the confidence sampler ranks a sample's tokens together and has no "
                         "per-token law to record")


def _attention_name(model: URSATransformer, device: torch.device) -> str:
    return resolve_attention(model.attn_backend, device, model.dtype, model.config.head_dim)


def _tunable(state: LoopState) -> bool:
    """Whether :meth:`Scheduler.tune` can pick a fused sampler here (a GPU, tensor-step sampler)."""
    return state.x.is_cuda and state.sched.mask_sampler != "confidence"
