"""The URSA transformer: a Qwen3 decoder run bidirectionally over [prompt, BOV, latents] (DESIGN §3).

Layer: RMSNorm -> attention (QK-norm, GQA, 3D RoPE, no mask) -> residual -> RMSNorm -> SwiGLU
MLP -> residual; a final RMSNorm and ``lm_head`` (hidden -> K). Logits of latent token ``j`` come
from the position one earlier (BOV predicts latent 0).

The q / k / v and gate / up projections are stored fused (``qkv_proj``, ``gate_up_proj``): one
GEMM each instead of three / two. Long sequences run the stages whose intermediate is at least three
hidden states wide (the MLP's gate / up, 6-8x; the q / k / v projection where it is 4x, as in 0.6B)
in sequence chunks: a token's math is the same, only the intermediate never exists for the whole
sequence at once (``activation_budget``, DESIGN §4; :func:`token_chunks`).
:mod:`ursa_engine.checkpoint` converts to and from the Qwen3 names of the checkpoint layout.
:class:`ModelConfig` (sizes, presets) lives in :mod:`ursa_engine.config`; ``from ursa_engine.model
import ModelConfig`` keeps working.
"""

from __future__ import annotations

import math
import os

import torch
import torch.utils.checkpoint
from torch import nn

from . import checkpoint, model_ops
from .attention import attention
from .config import ModelConfig
from .reference.rope import rope_tables


def latent_positions(prompt_len: int, latents_shape, *, device=None) -> torch.Tensor:
    """3D RoPE positions of ``[prompt, BOV, latents]`` (DESIGN §3).

    Prompt token ``p`` -> ``(p, p, p)``; BOV -> ``(P, P, P)``; latent ``(f, y, x)`` -> ``(P + 1 + f, y, x)``
    in row-major (f, y, x) order.

    Parameters
    ----------
    prompt_len : P, the (padded) prompt length
    latents_shape : (T, H, W), or (H, W) for an image (T = 1)

    Returns
    -------
    (P + 1 + T·H·W, 3) int64 tensor
    """
    shape = tuple(int(s) for s in latents_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"latents_shape: expected (T, H, W) or (H, W) of positive sizes, got {latents_shape}")
    if prompt_len < 0:
        raise ValueError(f"prompt_len: must be >= 0, got {prompt_len}")
    text = torch.arange(prompt_len + 1, device=device)[:, None].expand(-1, 3)  # prompt and BOV
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, device=device) for s in shape), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    grid[:, 0] += prompt_len + 1
    return torch.cat([text, grid])


ACTIVATION_BUDGET = 256 * 2**20  # bytes of one chunked stage's intermediate (gate / up, q / k / v)
WIDE = 3  # a stage is chunked when its intermediate is at least this many hidden states wide


def token_chunks(length: int, per_token_bytes: int, budget: int | None) -> list[tuple[int, int]]:
    """``[s, e)`` ranges covering ``0 .. length`` with at most ``budget`` bytes each (at least one
    token a range); one range when ``budget`` is None or the whole length fits."""
    if budget is None or length * per_token_bytes <= budget:
        return [(0, length)]
    step = max(1, int(budget) // max(int(per_token_bytes), 1))
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def sequence_ids(prompt_ids: torch.Tensor, latents: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Input ids ``[prompt, BOV, lm_vocab_size + latents]``: (B, P) and (B, ...) -> (B, P + 1 + N)."""
    B = prompt_ids.shape[0]
    bov = torch.full((B, 1), config.bov_token_id, dtype=torch.long, device=prompt_ids.device)
    flat = latents.reshape(B, math.prod(latents.shape[1:]))  # not (B, -1): B may be 0 (an empty dp slice)
    return torch.cat([prompt_ids.long(), bov, flat.long() + config.lm_vocab_size], 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None, *, backend="auto"):
        return model_ops.rms_norm(x, self.weight, self.eps, residual=residual, backend=backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_q + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_q * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        # optional replacement of attention(q, k, v, backend=) (Ulysses sequence parallel,
        # ursa_engine.distributed.ulysses); None: plain attention
        self.attend = None

    def project(self, x, cos, sin, *, ops_backend="auto"):
        """q (B, L, Hq, D), k and v (B, L, Hkv, D): projection, QK-norm and RoPE of x (B, L, hidden)."""
        d, nq, nkv = self.head_dim, self.n_q, self.n_kv
        qkv = self.qkv_proj(x)  # (B, L, (Hq + 2 Hkv) D)
        q = qkv[..., : nq * d].unflatten(-1, (nq, d))
        k = qkv[..., nq * d : (nq + nkv) * d].unflatten(-1, (nkv, d))
        v = qkv[..., (nq + nkv) * d :].unflatten(-1, (nkv, d))
        q, k = model_ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.eps,
                                      backend=ops_backend)
        return q, k, v

    def forward(self, x, cos, sin, *, attn_backend="auto", ops_backend="auto", chunks=None):
        # x: (B, L, hidden); cos, sin: (L, D/2) or (B, L, D/2); chunks: token ranges of the projection
        if chunks is None or len(chunks) == 1:
            q, k, v = self.project(x, cos, sin, ops_backend=ops_backend)
        else:  # q, k, v written range by range: the (B, L, (Hq + 2 Hkv) D) projection never exists whole
            B, L, _ = x.shape
            q = x.new_empty(B, L, self.n_q, self.head_dim)
            k, v = (x.new_empty(B, L, self.n_kv, self.head_dim) for _ in range(2))
            for s, e in chunks:
                parts = self.project(x[:, s:e], cos[..., s:e, :], sin[..., s:e, :], ops_backend=ops_backend)
                for whole, part in zip((q, k, v), parts, strict=True):
                    whole[:, s:e] = part
        o = (self.attend or attention)(q, k, v, backend=attn_backend)  # (B, L, Hq, D)
        return self.o_proj(o.flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, *, backend="auto"):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # views of one (B, L, 2I) GEMM output
        return self.down_proj(model_ops.swiglu(gate, up, backend=backend))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, *, attn_backend="auto", ops_backend="auto", qkv_chunks=None, mlp_chunks=None):
        a = self.self_attn(self.input_layernorm(h, backend=ops_backend), cos, sin,
                           attn_backend=attn_backend, ops_backend=ops_backend, chunks=qkv_chunks)
        h, n = self.post_attention_layernorm(a, h, backend=ops_backend)  # h += a; n = norm(h), fused
        if mlp_chunks is None or len(mlp_chunks) == 1:
            return h + self.mlp(n, backend=ops_backend)
        # h is this layer's own residual sum: the MLP output of each token range is added in place,
        # so the (B, L, 3·I) gate / up / SwiGLU intermediates exist for one range at a time
        for s, e in mlp_chunks:
            h[:, s:e] += self.mlp(n[:, s:e], backend=ops_backend)
        return h


class Decoder(nn.Module):
    """Qwen3's ``model`` submodule: embeddings, layers, final norm (checkpoint prefix ``model.``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class URSATransformer(nn.Module):
    """Bidirectional Qwen3 over ``[prompt, BOV, latents]`` returning logits over the K codes.

    ``URSATransformer(cfg)`` has random weights, N(0, init_std²) for linear and embedding
    weights, ones for norms, created directly on ``device`` in ``dtype`` (benchmarks, tests; the
    4B preset never exists in fp32); use :meth:`from_pretrained` for a checkpoint.
    ``attn_backend`` (see :mod:`ursa_engine.attention`), ``ops_backend``
    (``"auto" | "torch" | "triton"`` for RMSNorm, QK-norm + RoPE, SwiGLU) and ``activation_budget``
    (bytes of the MLP / wide q-k-v intermediate before those stages run in sequence chunks; None:
    never; chunking is off while autograd records) are plain attributes, as is
    ``gradient_checkpointing`` (default False): while autograd records, each decoder layer keeps
    only its input and recomputes its activations in the backward
    (``torch.utils.checkpoint``, non-reentrant); same loss and gradients, less memory.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype | None = None, device=None,
                 attn_backend: str = "auto", ops_backend: str = "auto", init_std: float = 0.02,
                 activation_budget: int | None = ACTIVATION_BUDGET):
        super().__init__()
        self.config = cfg
        self.attn_backend, self.ops_backend = attn_backend, ops_backend
        self.activation_budget = activation_budget
        self.gradient_checkpointing = False
        with torch.device("meta"):  # no memory until the final device and dtype are known
            self.model = Decoder(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.lm_head_size, bias=False)
        if dtype is not None:
            self.to(dtype)
        device = torch.device(device if device is not None else "cpu")
        if device.type != "meta":
            self.to_empty(device=device)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=init_std)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        self.requires_grad_(False)  # an inference engine; call requires_grad_(True) to train

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                        variant: str | None = None, **options) -> URSATransformer:
        """Load a diffusers-layout ``transformer/`` folder (``config.json`` + safetensors weights).

        The whole checkpoint is checked first (:func:`ursa_engine.checkpoint.read_weights`: one
        :class:`~ursa_engine.checkpoint.CheckpointError` listing every problem); the model is then
        built on the meta device and takes the read tensors as its parameters (no copy).

        Parameters
        ----------
        folder : the folder with ``config.json`` and safetensors weights
        dtype : compute dtype (default: the checkpoint's own)
        device : where the weights go (default: CPU); tensors are read straight to it
        variant : diffusers weight variant (``diffusion_pytorch_model.<variant>.safetensors``)
        options : ``attn_backend`` / ``ops_backend`` / ``activation_budget`` for the model
        """
        cfg, state = checkpoint.read_weights(folder, dtype=dtype, device=device, variant=variant)
        model = cls(cfg, device="meta", **options)
        model.load_state_dict(state, strict=True, assign=True)
        return model.requires_grad_(False)

    def save_pretrained(self, folder: str | os.PathLike, **options) -> None:
        """Write this model as a ``transformer/`` folder; see :func:`ursa_engine.checkpoint.save_transformer`."""
        checkpoint.save_transformer(self, folder, **options)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos / sin tables, (L, D/2) or (B, L, D/2), for positions (L, 3) or (B, L, 3)."""
        return rope_tables(positions.to(self.device), self.config.head_dim, self.config.rope_theta)

    def activation_chunks(self, batch: int, length: int, itemsize: int) -> dict:
        """Token ranges of the chunked stages for (batch, length) sequences: ``qkv_chunks`` (only
        where the q / k / v projection is at least :data:`WIDE` hidden states wide) and
        ``mlp_chunks``; None where a stage runs whole (no budget, autograd recording)."""
        cfg, budget = self.config, self.activation_budget
        if budget is None or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return {"qkv_chunks": None, "mlp_chunks": None}
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        mlp = 3 * cfg.intermediate_size  # gate / up output and the SwiGLU result
        wide = qkv >= WIDE * cfg.hidden_size
        return {"qkv_chunks": token_chunks(length, batch * qkv * itemsize, budget) if wide else None,
                "mlp_chunks": token_chunks(length, batch * mlp * itemsize, budget)}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, latent_tokens: int | None = None,
                attn_backend: str | None = None, ops_backend: str | None = None) -> torch.Tensor:
        """Logits over the K visual codes: ``lm_head`` of :meth:`hidden_states` (same arguments).

        Returns
        -------
        (B, L, K) logits, or (B, N, K) with ``latent_tokens``; the model's dtype
        """
        return self.lm_head(self.hidden_states(input_ids, positions, rope=rope, latent_tokens=latent_tokens,
                                               attn_backend=attn_backend, ops_backend=ops_backend))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                      rope: tuple[torch.Tensor, torch.Tensor] | None = None, latent_tokens: int | None = None,
                      attn_backend: str | None = None, ops_backend: str | None = None) -> torch.Tensor:
        """Final-normed hidden states, the input of ``lm_head`` (chunked losses call this).

        Parameters
        ----------
        input_ids : (B, L) int64, from :func:`sequence_ids`
        positions : (L, 3) or (B, L, 3) from :func:`latent_positions`; or give ``rope``
        rope : precomputed ``self.rope_tables(positions)`` (the engine computes them once)
        latent_tokens : N; when given, only the N positions that predict the last N tokens
            (``L − N − 1 .. L − 2``) go through the final norm and ``lm_head``
        attn_backend, ops_backend : override the model's attributes for this call

        Returns
        -------
        (B, L, hidden), or (B, N, hidden) with ``latent_tokens``; the model's dtype
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if rope is None:
            if positions is None:
                raise ValueError("positions: required (or pass rope=model.rope_tables(positions))")
            if positions.shape[-2] != L:
                raise ValueError(f"positions: {positions.shape[-2]} positions for {L} input ids")
            rope = self.rope_tables(positions)
        if latent_tokens is not None and not 0 < latent_tokens < L:
            raise ValueError(f"latent_tokens: must be in [1, {L}), got {latent_tokens}")
        attn_backend = attn_backend or self.attn_backend
        ops_backend = ops_backend or self.ops_backend
        cos, sin = rope
        h = self.model.embed_tokens(input_ids)  # (B, L, hidden)
        chunks = self.activation_chunks(input_ids.shape[0], L, h.element_size())
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # autograd keeps h (the layer's input) only; the layer runs again in the backward
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False,
                                                      attn_backend=attn_backend, ops_backend=ops_backend, **chunks)
            else:
                h = layer(h, cos, sin, attn_backend=attn_backend, ops_backend=ops_backend, **chunks)
        if latent_tokens is not None:
            h = h[:, L - latent_tokens - 1 : L - 1]  # position i predicts token i + 1
        return self.model.norm(h, backend=ops_backend)
