"""What the HTTP server needs of a checkpoint: prompts -> ids, size -> latent grid, tokens -> bytes.

Two kinds of roots: an URSA checkpoint (text prompts through ``root/tokenizer``, pixels through
``root/vae``) and a digits checkpoint (``digits.json``: the bundled CPU model, whose prompt is a
digit class, "7" or "a seven... 7"; its patch decoder gives real PNGs).
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..engine import Engine


class ServedModel:
    """An engine plus its request conventions.

    Parameters
    ----------
    engine : Engine
    digits : the digits checkpoint conventions (class-label prompts) instead of text prompts
    name : reported by ``/health`` and ``/metrics``
    """

    def __init__(self, engine: Engine, *, digits: bool = False, name: str = "model"):
        self.engine, self.digits, self.name = engine, digits, name
        self.default_guidance = 3.0 if digits else 7.0
        vae = engine.vae
        if vae is not None and digits:
            self.default_size = (int(vae.spatial_stride) * 8, int(vae.spatial_stride) * 4)  # (W, H): 16x8
        else:
            self.default_size = (1024, 1024)

    @classmethod
    def load(cls, root: str | Path | None = None, *, device=None, threads: int | None = None) -> ServedModel:
        """Load a root (default: the bundled digits model)."""
        from ..demo import DEFAULT_ROOT, DigitsModel

        root = Path(root) if root is not None else DEFAULT_ROOT
        if (root / "digits.json").is_file():
            return cls(DigitsModel.load(root, threads=threads).engine, digits=True, name=root.name)
        return cls(Engine.from_pretrained(root, device=device), name=root.name)

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, text: str, *, field: str = "prompt") -> torch.Tensor:
        """(P,) ids of one prompt ("" is the empty prompt)."""
        e = self.engine
        if self.digits:
            from ..digits import prompt_ids

            if not text.strip():
                label = -1
            else:
                found = re.findall(r"(?<![0-9])[0-9](?![0-9])", text)
                if len(found) != 1:
                    raise ValueError(f"{field}: the digits model takes one digit class 0-9 (e.g. '7' or 'a digit 7'), "
                                     f"got {text!r}")
                label = int(found[0])
            return prompt_ids([label], e.model.config.pad_token_id)[0]
        if e.tokenizer is None:
            raise ValueError(f"{field}: this checkpoint has no tokenizer/ for text prompts")
        if not text:
            return e.encode_prompts([[]], name=field)[0]
        return e.encode_prompts([text], name=field)[0]

    def latents_shape(self, size: str | None, frames: int) -> tuple[int, int, int]:
        """The latent grid of a ``"WxH"`` size and a frame count (needs the vae)."""
        vae = self.engine.vae
        if vae is None:
            raise ValueError("size: this checkpoint has no vae/: give latents_shape [T, h, w] instead")
        if size is None:
            w, h = self.default_size
        else:
            m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
            if not m:
                raise ValueError(f"size: expected 'WIDTHxHEIGHT' in pixels (e.g. '{self.default_size[0]}x"
                                 f"{self.default_size[1]}'), got {size!r}")
            w, h = int(m.group(1)), int(m.group(2))
        try:
            return tuple(int(v) for v in vae.latent_shape(int(frames), h, w))
        except ValueError as err:
            raise ValueError(f"size: {err}") from None

    # ------------------------------------------------------------------ responses
    def frames(self, tokens: torch.Tensor) -> np.ndarray:
        """uint8 frames (n, F, H, W, 3) of tokens (n, T, h, w)."""
        return self.engine.decode(tokens)

    @staticmethod
    def png(frame: np.ndarray) -> bytes:
        """One uint8 frame (H, W, 3) as PNG bytes."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
        return buf.getvalue()

    def image(self, frame: np.ndarray, fmt: str = "png", compression: int | None = None) -> tuple[bytes, str]:
        """One uint8 frame (H, W, 3) as ``fmt`` bytes and their MIME type.

        ``fmt``: png (lossless), jpeg or webp; ``compression`` (OpenAI's ``output_compression``, 0-100,
        default 100) is their quality (webp 100: lossless); png ignores it."""
        from PIL import Image

        img = Image.fromarray(np.ascontiguousarray(frame))
        buf = io.BytesIO()
        q = 100 if compression is None else int(compression)
        if fmt == "png":
            return self.png(frame), "image/png"
        if fmt == "jpeg":
            img.save(buf, format="JPEG", quality=q)
        elif fmt == "webp":
            img.save(buf, format="WEBP", **({"lossless": True} if q >= 100 else {"quality": q}))
        else:
            raise ValueError(f"output_format: expected png, jpeg or webp for one image, got {fmt!r}")
        return buf.getvalue(), f"image/{fmt}"

    @staticmethod
    def gif(frames: np.ndarray, duration_ms: int = 200) -> bytes:
        """uint8 frames (F, H, W, 3) as an animated GIF (looping; ``duration_ms`` per frame, Pillow's
        adaptive palette per frame)."""
        from PIL import Image

        imgs = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        buf = io.BytesIO()
        imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(duration_ms), loop=0)
        return buf.getvalue()

    def text_tokens(self, ids: torch.Tensor) -> int:
        """Prompt ids that are not padding (OpenAI's ``usage.input_tokens_details.text_tokens``)."""
        pad = getattr(self.engine.model.config, "pad_token_id", None)
        return int(ids.numel() if pad is None else (ids != pad).sum())

    @staticmethod
    def mp4(frames: np.ndarray, fps: float = 12) -> bytes:
        """uint8 frames (F, H, W, 3) as H.264 MP4 bytes (PyAV, :func:`ursa_engine.media.save_video`)."""
        from ..media import save_video

        with tempfile.TemporaryDirectory() as tmp:
            path = save_video(Path(tmp) / "out.mp4", frames, fps=fps)
            return Path(path).read_bytes()
