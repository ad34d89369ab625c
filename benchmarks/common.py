"""Pieces shared by the sampler-op benchmarks: providers, dense subsets, random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .harness import rotations
from .records import BenchContext

# The dense reference (backend="torch") builds several float64 (D, K) tensors: give it at most
# this many elements per tensor, timing a subset of the tokens and scaling linearly (its cost is
# per token: every op is row-wise and the one matmul is (D, m) @ (m, K)).
DENSE_ELEMENTS = {"gpu": 1 << 27, "cpu": 1 << 25, "smoke": 1 << 22}

GUIDANCE = {"guidance_scale": 7.0, "guidance_trunc": 0.9}  # the authors' defaults (DESIGN §3)
NUM_STEPS = 50  # video default; the timed step is k = 25 (t = 0.5 < trunc: guidance on)

LOGITS_NOTE = "randn (std 1): x̂1 ≈ uniform, almost every token moves (the slow case)"


def providers(ctx: BenchContext) -> tuple[str, ...]:
    """Backends to time: the dense reference first (every other figure is a ratio to it).

    Triton on the CPU only runs under its interpreter, which says nothing about speed.
    """
    if ctx.device.type == "cuda":
        return ("torch", "triton", "native")
    return ("torch", "native")


def dense_tokens(ctx: BenchContext, tokens: int, K: int) -> int:
    """Tokens given to the dense reference: the largest power of two it can hold, ≤ tokens."""
    limit = max(1, DENSE_ELEMENTS[ctx.mode] // K)
    sub = 1 << (limit.bit_length() - 1)
    return min(tokens, sub)


def scale_note(tokens: int, sub: int) -> str | None:
    if sub == tokens:
        return None
    return f"dense reference timed on {sub} of {tokens} tokens, scaled linearly (x{tokens / sub:g})"


def logits_dtype(ctx: BenchContext) -> torch.dtype:
    """bf16 on a GPU (what the model emits), float32 on the CPU."""
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32


def random_logits(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    if device.type == "cuda" or dtype == torch.float32:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


@dataclass(frozen=True)
class CodebookCase:
    """A codebook of a benchmark: FSQ levels, or a random (K, m) table (IBQ-like)."""

    name: str
    levels: tuple[int, ...] | None = None
    K: int = 0
    m: int = 0
    alpha: float = 1.0
    c: float = 5.0

    @property
    def size(self) -> int:
        if self.levels:
            n = 1
            for v in self.levels:
                n *= v
            return n
        return self.K

    @property
    def dim(self) -> int:
        return len(self.levels) if self.levels else self.m

    def build(self, ue, gen_seed: int):
        if self.levels:
            return ue.Codebook.fsq(self.levels)
        gen = torch.Generator().manual_seed(gen_seed)
        return ue.Codebook(torch.randn(self.K, self.m, generator=gen))


FSQ = CodebookCase("fsq", levels=(8, 8, 8, 5, 5, 5), alpha=1.0, c=5.0)  # K = 64,000, m = 6
IBQ = CodebookCase("ibq", K=131_072, m=256, alpha=0.5, c=6.0)
FSQ_SMOKE = CodebookCase("fsq-small", levels=(8, 5, 5), alpha=1.0, c=5.0)  # K = 200
TABLE_SMOKE = CodebookCase("table-small", K=97, m=8, alpha=0.5, c=6.0)


def step_inputs(ctx: BenchContext, tokens: int, K: int, *, guided: bool):
    """Rotating sets of (cond logits, uncond logits or None, x) of shape (1, tokens[, K])."""
    dtype = logits_dtype(ctx)
    gen = ctx.generator()
    set_bytes = (2 if guided else 1) * tokens * K * torch.tensor([], dtype=dtype).element_size()
    sets = []
    for _ in range(rotations(set_bytes, ctx.device)):
        cond = random_logits(gen, (1, tokens, K), dtype, ctx.device)
        uncond = random_logits(gen, (1, tokens, K), dtype, ctx.device) if guided else None
        x = torch.randint(0, K, (1, tokens), generator=gen, device=ctx.device)
        sets.append((cond, uncond, x))
    return sets


def step_bytes(tokens: int, K: int, dtype: torch.dtype, *, guided: bool) -> float:
    """Fewest bytes of one sampler step: every logit read once, x read and written once."""
    elt = torch.tensor([], dtype=dtype).element_size()
    return (2 if guided else 1) * tokens * K * elt + 2 * 8 * tokens
