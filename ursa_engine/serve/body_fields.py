"""The fields every generation body shares (the images and the videos routes, issue 23): OpenAI's
``prompt``, ``model``, ``user`` and ``safety_identifier``, then this server's sampling extensions.

Each route's schema (:mod:`.image_schema`, :mod:`.video_inputs`) subclasses :class:`GenerationFields`
and adds its own fields; what a route does with a shared field is the same everywhere:

- ``model`` names a per-request LoRA adapter of this server (``/v1/models``) or is ignored (the served
  checkpoint answers): :func:`lora_of`;
- ``user`` / ``safety_identifier`` are recorded per key (:attr:`GenerationFields.end_user`: OpenAI's
  precedence);
- ``prompt`` / ``negative_prompt`` are bounded by ``max_prompt_chars`` before tokenizing
  (:attr:`GenerationFields.texts`, for :meth:`~.gateway.Gateway.check_texts`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ID = r"^[A-Za-z0-9_.:-]{1,64}$"  # request ids and adapter names


class GenerationFields(BaseModel):
    """OpenAI's fields common to every generation body, then the sampling extensions (unknown fields:
    a 400 naming them)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = Field(None, max_length=256)  # a LoRA adapter of /v1/models picks it; else ignored
    user: str | None = Field(None, max_length=256)  # recorded (per-key metrics)
    safety_identifier: str | None = Field(None, max_length=256)  # recorded; wins over user
    # extensions
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=-100, le=100)
    guidance_trunc: float = Field(0.9, ge=0, le=1)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    lora: str | None = Field(None, pattern=ID)

    @property
    def end_user(self) -> str | None:
        """The end user's id: a non-empty ``safety_identifier``, else ``user`` (OpenAI's precedence)."""
        return self.safety_identifier or self.user or None

    @property
    def texts(self) -> dict:
        """The text fields bounded by ``max_prompt_chars`` (``{name: text or None}``)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt}


def lora_of(body: GenerationFields, loras) -> str | None:
    """The request's adapter: ``lora``, else ``model`` when it names one of ``loras`` (the batcher's
    per-request adapters, :class:`~ursa_engine.adapters.RowAdapters`), else None."""
    if body.lora is not None:
        return body.lora
    if body.model is not None and body.model in loras.names:
        return body.model
    return None


__all__ = ["GenerationFields", "ID", "lora_of"]
