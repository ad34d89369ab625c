"""A drop-in for the authors' ``diffnext.pipelines.URSAPipeline``, running on :class:`Engine` (DESIGN §8).

    import torch, ursa_engine as ue
    pipe = ue.URSAPipeline.from_pretrained("URSA-1.7B-FSQ320", torch_dtype=torch.float16).to("cuda")
    image = pipe("a bear", num_frames=1).frames[0]                              # a PIL image
    video = pipe("motion=9.0, a bear", num_frames=49, num_inference_steps=50).frames[0]  # (49, 320, 512, 3) uint8
    video = pipe("motion=5.0, a bear", num_frames=49, num_inference_steps=50, video=video,
                 num_cond_frames=13, cond_noise_scale=0.1).frames[0]          # extension, as the README loop

The call takes the authors' arguments and defaults (``height=320, width=512, num_frames=1,
num_inference_steps=25, guidance_scale=7, guidance_trunc=0.9``, negative prompt ``""``...) and returns
their output: ``.frames`` is a list of PIL images for one frame (``output_type="pil"``), a uint8
array (B, F, H, W, 3) for video ("pil" becomes "np" for video, as theirs), uint8 arrays for "np"
(an image tokenizer's single frames as (B, H, W, 3), as theirs), the decoded float pixels for
"pt" and the tokens (B, T, h, w) for "latent".

Differences from the authors' pipeline:

- Randomness is counter-based (DESIGN §2.5): tokens differ from theirs for the same seed (same
  distribution). A ``torch.Generator`` only contributes its seed, ``generator.initial_seed()`` (mod
  2^62), so one generator gives the same result on every call (theirs advances); ``seed=`` is
  accepted too and wins over ``generator``; with neither, a seed is drawn from torch's global RNG
  (``torch.manual_seed`` makes calls repeatable). Sample ``b`` of a call uses ``seed + b``.
- ``flow_shift`` applies to that call only (theirs sets the scheduler's shift for later calls too).
- Past ``guidance_trunc`` the unconditional half is not computed (theirs computes it and scales
  the difference by 1), and step 0 of the metric path, an identity, is skipped.
- ``height`` / ``width`` must be multiples of the tokenizer's spatial stride and ``num_frames``
  1 + 4k for the video tokenizer: an error names the argument (theirs floors silently); pixel
  conditioning must have the generated size; an unknown ``output_type`` is an error.
- ``num_cond_frames=`` (a keyword, as in their README): only the last ``num_cond_frames`` frames
  of ``video`` are encoded (theirs encodes all of ``video``; the README slices it first, which
  gives the same result). ``freeze_cond=True`` (ours) keeps the conditioning frames fixed.
- ``mask_image=`` (ours, diffusers' inpainting argument): with it, ``image`` is not a conditioning
  frame but the picture to inpaint, at the token level (``Engine.generate(known_tokens=,
  known_mask=)``, DESIGN §2.4): white (>= 128) repaints, black keeps, or, for a mask with an alpha
  channel, alpha 0 repaints (OpenAI's convention; :func:`ursa_engine.conditioning.keep_from_mask_image`).
  A token is kept iff its whole patch is kept; it holds the image's code at every step. One image,
  of the generated size; the mask of the image's size.
- An ``image`` / ``video`` batch has 1 row (shared) or one per generated sample (prompts ×
  ``num_images_per_prompt``); theirs expands its batch to ``num_images_per_prompt``.
- ``vae_batch_size`` is accepted; decoding always runs one sample at a time, memory-chunked inside
  the tokenizer (same values).
- ``torch_dtype=None`` means bf16 on CUDA and the checkpoint's dtype on the CPU (diffusers: fp32).
  ``from_pretrained`` takes a local folder or a hub id (only the files read are downloaded);
  ``device=`` loads the weights straight there; ``.to`` moves them.
- The output also carries ``.result``: the engine's :class:`GenerationResult` (tokens, step and
  decode times, peak memory).

As theirs: ``guidance_scale <= 1`` runs without guidance; the default negative prompt is the empty
one; ``image`` / ``video`` replace ``cond_latents`` (``video`` wins over ``image``); with
``cond_indices``, latent frame ``i`` takes frame ``i`` of the conditioning (an empty list conditions
nothing); ``num_images_per_prompt`` repeats text prompts (not given ``prompt_ids``); other keyword
arguments are ignored (their README calls ``pipe(**locals())``).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _validate, conditioning
from .conditioning import as_index_list
from .engine import Engine, GenerationResult

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_SEED_RANGE = 1 << 62  # Engine seeds are ints in [0, 2^62)


def _number(name: str, value) -> float:
    """A real number argument as a float, or a TypeError naming it (not float()'s own message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _integer(name: str, value) -> int:
    """An int argument (ints and integral numbers such as 25.0), or an error naming it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}") from None


@dataclass
class URSAPipelineOutput:
    """``frames``: PIL images, uint8 array, float pixel tensor or tokens (see :class:`URSAPipeline`);
    ``result``: the engine's :class:`GenerationResult` of the call."""

    frames: list | np.ndarray | torch.Tensor
    result: GenerationResult | None = None

    def __getitem__(self, key):  # diffusers' BaseOutput: out[0] / out["frames"]
        return getattr(self, key) if isinstance(key, str) else (self.frames,)[key]


class URSAPipeline:
    """The authors' ``URSAPipeline`` call on an :class:`Engine` (see the module docstring)."""

    def __init__(self, engine: Engine):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine: expected a ue.Engine, got {type(engine).__name__}")
        self.engine = engine
        self._progress = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device=None, variant: str | None = None, **kwargs) -> URSAPipeline:
        """Load a checkpoint (transformer/, scheduler/, vae/, tokenizer/): a local folder or a hub id
        such as ``"BAAI/URSA-1.7B-FSQ320"`` (diffusers' ``revision``, ``cache_dir``, ``local_files_only``,
        ``token``; only the files read are downloaded, :func:`ursa_engine.hub.resolve_root`).

        ``transformer_weights=PATH`` lays a fine-tuned transformer-only state dict over the
        checkpoint's transformer (:meth:`Engine.from_pretrained`). ``trust_remote_code`` is accepted
        and ignored; other keywords go to :meth:`Engine.from_pretrained` (``mode``, ``attn_backend``,
        ``shift``...).
        """
        from .hub import resolve_root

        kwargs.pop("trust_remote_code", None)
        if "use_auth_token" in kwargs:  # diffusers' older name of token=
            kwargs.setdefault("token", kwargs.pop("use_auth_token"))
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        root = resolve_root(pretrained_model_name_or_path, variant=variant,
                            transformer_weights=kwargs.get("transformer_weights") is None,
                            name="pretrained_model_name_or_path", **hub)
        if not root.is_dir():
            raise FileNotFoundError(f"pretrained_model_name_or_path: {root} is not a folder (expected a checkpoint "
                                    "root with transformer/, scheduler/, vae/ and tokenizer/)")
        return cls(Engine.from_pretrained(root, dtype=torch_dtype, device=device, variant=variant, **kwargs))

    # ------------------------------------------------------------------ components
    @property
    def transformer(self):
        return self.engine.model

    @property
    def vae(self):
        return self.engine.vae

    @property
    def scheduler(self):
        return self.engine.scheduler

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def to(self, *args, **kwargs) -> URSAPipeline:
        """``.to(device)``, ``.to(dtype)``, ``.to(device, dtype)`` or keywords ``device=`` / ``dtype=``."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        if kwargs:
            raise TypeError(f"to: unexpected keywords {sorted(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise TypeError(f"to: expected a device or a dtype, got {a!r}")
        self.engine.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, disable: bool = False, **_) -> None:
        """diffusers' switch for the denoising progress bar (shown by default)."""
        self._progress = not disable

    # ------------------------------------------------------------------ LoRA (diffusers' names, DESIGN §9)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          **kwargs) -> None:
        """Load a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) into the
        transformer: :meth:`Engine.load_lora` at scale 1, merged into the weights at once (diffusers keeps
        it unfused until :meth:`fuse_lora`; here it costs nothing per step either way). ``weight_name``
        other than PEFT's own file names is refused (a different file than asked would load); other
        keywords are ignored. Errors name the diffusers arguments."""
        weight_name = kwargs.get("weight_name")
        if weight_name is not None and Path(str(weight_name)).name not in ("adapter_model.safetensors",
                                                                           "adapter_model.bin"):
            raise ValueError(f"weight_name: only a PEFT folder's adapter_model.safetensors / .bin is read, got "
                             f"{weight_name!r}")
        try:
            self.engine.load_lora(pretrained_model_name_or_path_or_dict, 1.0, adapter_name)
        except ValueError as err:  # the engine names its own parameters: say the pipeline's
            msg = str(err)
            for ours, theirs in (("path:", "pretrained_model_name_or_path_or_dict:"), ("name:", "adapter_name:")):
                if msg.startswith(ours):
                    raise type(err)(theirs + msg[len(ours):]) from None
            raise

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None, **kwargs) -> None:
        """Merge the loaded adapters (``adapter_names``, default all) at ``lora_scale``: the weights
        become ``W + lora_scale·γ·B A`` per adapter (re-merged from the base weights, not compounded)."""
        merged = getattr(self.engine, "_merged_loras", None)
        if merged is None or not merged.loaded:
            raise ValueError("fuse_lora: no LoRA is loaded (call load_lora_weights first)")
        names = list(adapter_names or merged.names)
        unknown = [n for n in names if n not in merged.names]
        if unknown:  # checked before any weight changes: nothing half-merged
            raise ValueError(f"adapter_names: {unknown} are not loaded (loaded: {list(merged.names)})")
        if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool) or lora_scale != lora_scale:
            raise ValueError(f"lora_scale: expected a number, got {lora_scale!r}")
        for name in names:
            merged.set_scale(lora_scale, name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the transformer's weights are the base ones again, bit for bit."""
        self.engine.unload_lora()

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height=320, width=512, num_frames=1,
                 num_inference_steps=25, guidance_scale=7, guidance_trunc=0.9, flow_shift=None, image=None,
                 video=None, num_images_per_prompt=1, generator=None, latents=None, latents_shape=None,
                 cond_latents=None, cond_indices=None, cond_noise_scale=0, prompt_ids=None, negative_prompt_ids=None,
                 output_type="pil", max_prompt_length=320, vae_batch_size=1, mask_image=None,
                 **kwargs) -> URSAPipelineOutput:
        """Generate images or videos (the authors' arguments; see the module docstring).

        Extra keywords: ``seed`` (int, wins over ``generator``), ``num_cond_frames`` (use the last
        frames of ``video``), ``freeze_cond`` (keep conditioning frames fixed); others are ignored.
        ``mask_image`` (PIL or array, white = repaint; with alpha: transparent = repaint) makes
        ``image`` the picture to inpaint instead of a conditioning frame.
        """
        engine = self.engine
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and engine.vae is None:
            raise ValueError(f"output_type: {output_type!r} needs the checkpoint's tokenizer (vae/); use 'latent'")
        shape = self._latents_shape(latents_shape, num_frames, height, width)
        prompts, negatives, B = self._prompts(prompt, negative_prompt, prompt_ids, negative_prompt_ids,
                                              num_images_per_prompt)
        seed = self._seed(kwargs.get("seed"), generator)
        known = {}
        if mask_image is not None:  # inpainting: image holds its kept tokens instead of conditioning frame 0
            if image is None or video is not None:
                raise ValueError("mask_image: inpaints image= (give image=, and no video=)")
            keep = conditioning.keep_from_mask_image(mask_image, "mask_image")
            tokens, mask = conditioning.encode_inpaint(engine.vae, image, keep, shape, name="mask_image")
            known, image = {"known_tokens": tokens.to(engine.device), "known_mask": mask.to(engine.device)}, None
        if video is not None or image is not None:  # pixels replace cond_latents; video wins (as theirs)
            pixels = {"video": video, "num_cond_frames": kwargs.get("num_cond_frames")} if video is not None \
                else {"image": image}
            cond_latents = engine.encode_condition(latents_shape=shape, batch=B, **pixels)
        if cond_latents is not None and cond_indices is not None:
            cond_latents, cond_indices = self._indexed(cond_latents, cond_indices)
        guidance_scale = _number("guidance_scale", guidance_scale)
        result = engine.generate(
            prompts, negatives, shape, guidance_scale=guidance_scale if guidance_scale > 1 else 1.0,
            guidance_trunc=guidance_trunc, num_steps=_integer("num_inference_steps", num_inference_steps),
            shift=flow_shift or None, seed=seed, latents=latents, cond_latents=cond_latents, cond_indices=cond_indices,
            cond_noise_scale=_number("cond_noise_scale", cond_noise_scale),
            freeze_cond=bool(kwargs.get("freeze_cond", False)),
            prompt_length=max_prompt_length, progress=self._progress, decode=output_type in ("pil", "np"), **known)
        return URSAPipelineOutput(frames=self._postprocess(result, output_type), result=result)

    # ------------------------------------------------------------------ pieces
    def _latents_shape(self, latents_shape, num_frames, height, width) -> tuple[int, int, int]:
        if latents_shape is not None:
            return _validate.latents_shape(latents_shape)
        if self.engine.vae is None:
            raise ValueError("latents_shape: without a tokenizer (vae/) height / width / num_frames cannot be mapped "
                             "to latents; pass latents_shape=(T, h, w)")
        return self.engine.vae.latent_shape(num_frames, height, width)

    def _prompts(self, prompt, negative_prompt, prompt_ids, negative_prompt_ids, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {n!r}")
        if prompt_ids is not None:
            prompts = prompt_ids
            B = len(prompt_ids)
        elif prompt is None:
            raise ValueError("prompt: give a prompt (str or list of str) or prompt_ids")
        else:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not texts or not all(isinstance(p, str) for p in texts):
                raise ValueError("prompt: expected a string or a non-empty list of strings")
            prompts = [p for p in texts for _ in range(n)]
            B = len(prompts)
        if negative_prompt_ids is not None:
            negatives = negative_prompt_ids
        elif negative_prompt is None or negative_prompt == "":
            negatives = None  # the engine's default: the empty prompt, all pads (= theirs "")
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt]  # one negative prompt serves every row
        else:
            if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
                raise TypeError(f"negative_prompt: expected a string or a list of strings, got {negative_prompt!r}")
            negs = list(negative_prompt)
            if prompt_ids is None and len(negs) not in (1, B // n):
                raise ValueError(f"negative_prompt: {len(negs)} negative prompts for {B // n} prompts")
            negatives = negs if prompt_ids is not None or len(negs) == 1 else [p for p in negs for _ in range(n)]
        return prompts, negatives, B

    @staticmethod
    def _seed(seed, generator) -> int:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected one torch.Generator (its initial_seed() seeds the engine), "
                            f"got {type(generator).__name__}")
        if seed is not None:
            return seed
        if generator is None:
            return int(torch.randint(0, _SEED_RANGE, (), dtype=torch.int64))
        return generator.initial_seed() % _SEED_RANGE

    @staticmethod
    def _indexed(cond_latents, cond_indices):
        """Theirs: latent frame ``i`` takes ``cond_latents[:, i]`` for every ``i`` in ``cond_indices``."""
        idx = as_index_list(cond_indices)
        if not idx:
            return None, None  # theirs writes nothing for an empty list
        cond = torch.as_tensor(cond_latents)
        cond = cond[None] if cond.dim() == 3 else cond
        Tc = cond.shape[1] if cond.dim() == 4 else 0
        if any(not -Tc <= i < Tc for i in idx):
            raise ValueError(f"cond_indices: {idx} index the conditioning frames, which has {Tc}")
        return cond[:, idx], idx

    def _postprocess(self, result: GenerationResult, output_type: str):
        tokens, vae = result.tokens, self.engine.vae
        if output_type == "latent":
            return tokens
        single = vae is not None and vae.temporal_stride == 1 and tokens.shape[1] == 1  # theirs: 4D images
        if output_type == "pt":
            pixels = vae.decode(tokens)  # (B, 3, F, H, W), unclamped, in the tokenizer's dtype
            return pixels[:, :, 0] if single else pixels
        frames = result.frames  # (B, F, H, W, 3) uint8
        if output_type == "pil" and frames.shape[1] == 1:
            from PIL import Image

            return [Image.fromarray(f) for f in frames.reshape(-1, *frames.shape[2:])]
        return frames[:, 0] if single else frames
