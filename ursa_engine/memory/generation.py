"""Planned peak memory of a whole generation at real size, computed on the CPU (issue 11).

:func:`plan_generation` runs one denoising step of the engine's own step body
(:meth:`ursa_engine.graphs.LoopState.body`, graph-style: the step index is a tensor) and then the
tokenizer's decode, on ``FakeTensorMode`` tensors — weights included, so nothing of real size is
allocated — with :class:`~.tracker.LiveBytes` counting every live storage from the first weight on.
Backend choices are those of a CUDA device (:func:`ursa_engine.ops_library.as_gpu`): the Triton
model ops, the fused head + x̂1 draw and the fused sampler, each a ``torch.library`` custom op whose
fake allocates what the kernel returns and whose scratch memory is declared
(:func:`ursa_engine.ops_library.workspace_buffers`: the same functions the launchers size their
scratch with, each buffer counted as a tensor). Attention is the backend
:func:`ursa_engine.attention.resolve_attention` picks on a CUDA device (:mod:`.attention`):
flash-attn (GQA native) when importable, else SDPA's fused kernels with k / v expanded to the
query heads as :func:`ursa_engine.attention.attention` does on CUDA (those bytes counted).

Phases (each figure is live bytes **including** everything resident: the peak
``torch.cuda.max_memory_allocated`` would show from an empty device, minus kernel workspaces that
no op declares — cuBLAS, flash-attn tiles — and the CUDA context):

* ``weights``: the transformer, the tokenizer (encoder and decoder: the engine keeps both) and the
  codebook table on the device;
* ``inputs``: the loop's static buffers (ids of the 2B rows, tokens, rope tables, seeds, the
  engine's and the loop state's own buffers);
* ``step``: the whole loop body (:meth:`~ursa_engine.graphs.LoopState.body`); the phases below
  are nested in it (reported without the ``step/`` prefix) and what none claims is its own
  (``own_allocated_bytes``): nothing the step allocates falls outside a phase (``unphased_bytes``);
* ``activations``: the transformer forward, with ``activations/attention`` (the self-attention
  blocks: q / k / v projection, QK-norm + RoPE, attention, output projection) and
  ``activations/mlp`` nested in it;
* ``head + sampler``: ``lm_head`` + x̂1 draw and the sampler step, by token range (``lm_head``
  nested: the chunked head's logits; a top-level ``lm_head``: whole logits of a confidence sampler);
* ``decode``: the tokenizer's decode of the final tokens (the step's buffers are freed first).

For every phase: its peak, the largest storage created in it and the one with the most elements;
``dk_tensors`` lists every storage and declared workspace tensor the step created with at least
n·K elements (n = latent tokens of one sample, K = the codebook size: the logits of one sample in
one pass, so a whole pass's logits under CFG cannot hide below 2·n·K), ``dk_buffers`` their
phases: none is the goal of issues 11 and 20.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..engine import LOGITS_BUDGET
from ..model import ACTIVATION_BUDGET
from .attention import attending, planned_attention
from .tracker import CUDA_GRANULARITY, LiveBytes

PHASES = ("weights", "inputs", "step", "activations", "activations/attention", "activations/mlp", "lm_head",
          "head + sampler", "head + sampler/lm_head", "decode")
FSQ_LEVELS = (8, 8, 8, 5, 5, 5)  # Cosmos FSQ, K = 64,000 (DESIGN §2.1)
IBQ_K, IBQ_DIM = 131_072, 256  # IBQ codebook (DESIGN §2.1)
# URSA's IBQ1024 image tokenizer (as benchmarks/bench_vae.py plans it): stride 16, K = 131,072, m = 256;
# latent_channels = 256 assumed, the rest the authors' class defaults.
IBQ1024 = {"block_out_channels": [128, 128, 256, 256, 512], "num_vq_embeddings": IBQ_K, "vq_embed_dim": IBQ_DIM,
           "latent_channels": 256}
PAPER_SCHEDULE = {"fsq": (1.0, 5.0), "ibq": (0.5, 6.0)}  # (α, c) of the metric path (DESIGN §2.2)


@dataclass
class GenerationPlan:
    """Planned live bytes of one generation step and its decode (see the module docstring)."""

    model: str
    latents_shape: list[int]
    batch: int
    cfg: bool
    rows: int  # sequences the transformer runs (2B with guidance)
    seq_len: int
    latent_tokens: int  # n = T·H·W a sample
    codebook: str
    codebook_size: int
    dtype: str
    path: str
    head: str  # "fused" (x̂1 inside the lm_head GEMM) or "chunked" (lm_head per token range)
    sampler: str  # the sampler step: "triton" custom op (fused) or the reference
    head_chunks: int  # token ranges of the head + sampler
    logits_budget: int | None
    activation_budget: int | None
    mlp_chunks: int
    qkv_chunks: int
    tokenizer: str | None
    attention: str
    peak_bytes: int
    peak_phase: str
    peak_op: str | None
    peak_tensors: list[dict]
    weight_bytes: dict  # transformer, tokenizer, codebook
    phases: dict  # name -> {"peak_bytes", "start_bytes", "largest", "most_elements"}
    dk_elements: int  # n·K: one sample's logits of one pass
    dk_buffers: list[str]  # phases that created a storage or declared workspace of >= n·K elements (goal: none)
    dk_tensors: list[dict] = field(default_factory=list)  # those storages / workspace tensors
    attention_backend: str = ""  # what ursa_engine.attention picks on a CUDA device
    kv_expansion_bytes: int = 0  # k / v expanded to the query heads by SDPA on CUDA, a layer (counted)
    unphased_bytes: int = 0  # bytes created outside every phase (0: every allocation is in one)
    granularity: int = CUDA_GRANULARITY
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A text table: peak and largest tensor of every phase."""
        lines = [f"plan: {self.model}, latents {'x'.join(map(str, self.latents_shape))} (n = {self.latent_tokens:,} "
                 f"a sample, L = {self.seq_len:,}), batch {self.batch}, {'CFG' if self.cfg else 'no CFG'} "
                 f"({self.rows} rows), {self.dtype}, {self.codebook} K = {self.codebook_size:,}",
                 f"head: {self.head} ({self.head_chunks} token range(s)), sampler: {self.sampler}, attention: "
                 f"{self.attention}, MLP in {self.mlp_chunks} sequence chunk(s)"
                 + (f", q/k/v in {self.qkv_chunks}" if self.qkv_chunks > 1 else ""),
                 f"{'phase':<24}{'peak':>12}  largest tensor",
                 "-" * 96]
        for name in PHASES:
            p = self.phases.get(name)
            if p is None:
                continue
            big = p["largest"]
            what = (f"{_gb(big['bytes'])} {tuple(big['shape'])} {big['dtype']} ({big['op']})" if big else "-")
            lines.append(f"{name:<24}{_gb(p['peak_bytes']):>12}  {what}")
        lines.append("-" * 96)
        lines.append(f"{'peak':<24}{_gb(self.peak_bytes):>12}  in {self.peak_phase!r} at {self.peak_op}")
        lines.append(f"weights: transformer {_gb(self.weight_bytes['transformer'])}, tokenizer "
                     f"{_gb(self.weight_bytes['tokenizer'])}, codebook {_gb(self.weight_bytes['codebook'])}")
        lines.append(f"(n, K) buffers (>= n·K = {self.dk_elements:,} elements, storages and declared workspaces of "
                     "the step): " + ("; ".join(f"{t['phase']}: {tuple(t['shape'])} {t['dtype']} ({t['op']})"
                                               for t in self.dk_tensors) if self.dk_tensors else "none"))
        return "\n".join(lines)


def _unstep(phase: str) -> str:
    """Phase names nested in the loop body's "step" phase, as reported (``step/activations`` -> ``activations``)."""
    return phase[len("step/"):] if phase.startswith("step/") else phase


def _unstepped(record: dict | None) -> dict | None:
    """A storage record with its phase named as reported (:func:`_unstep`)."""
    return None if record is None else dict(record, phase=_unstep(record["phase"]))


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _config_and_codebook(preset, root, codebook):
    """(ModelConfig, codebook kind, path factory, tokenizer (class, config) or None, model name)."""
    from ..compat import KineticOptimalScheduler
    from ..config import ModelConfig
    from ..vae import CosmosFSQTokenizer, IBQTokenizer, read_tokenizer_config

    if root is not None:
        root = Path(root)
        cfg = ModelConfig.from_json(root / "transformer" / "config.json")
        path = KineticOptimalScheduler.from_pretrained(root / "scheduler").path
        kind = "fsq" if getattr(getattr(path, "codebook", None), "levels", None) else "table"
        tok = read_tokenizer_config(root / "vae") if (root / "vae" / "config.json").is_file() else None
        return cfg, kind, (lambda: path), tok, str(root)
    if codebook not in ("fsq", "ibq"):
        raise ValueError(f"codebook: expected 'fsq' or 'ibq', got {codebook!r}")
    K = 64_000 if codebook == "fsq" else IBQ_K
    base = ModelConfig.preset(preset)
    cfg = ModelConfig.preset(preset, lm_head_size=K, vocab_size=base.lm_vocab_size + K)

    def make_path():
        from ..codebook import Codebook
        from ..paths import MetricPath

        if codebook == "fsq":
            cb = Codebook.fsq(FSQ_LEVELS)
        else:  # a random table of the IBQ size: only its shape matters here
            cb = Codebook(torch.randn(IBQ_K, IBQ_DIM, generator=torch.Generator().manual_seed(0)))
        alpha, c = PAPER_SCHEDULE[codebook]
        return MetricPath(cb, alpha=alpha, c=c)

    tok = (CosmosFSQTokenizer, {}) if codebook == "fsq" else (IBQTokenizer, dict(IBQ1024))
    return cfg, codebook, make_path, tok, preset


def plan_generation(preset: str = "ursa-1.7b", latents_shape=(13, 40, 64), *, dtype: torch.dtype = torch.bfloat16,
                    cfg: bool = True, batch: int = 1, root=None, codebook: str = "auto", prompt_length: int = 320,
                    head: str = "auto", logits_budget: int | None = LOGITS_BUDGET,
                    activation_budget: int | None = ACTIVATION_BUDGET,
                    decode: bool = True, granularity: int = CUDA_GRANULARITY) -> GenerationPlan:
    """Plan the peak memory of one generation (a guided step and the decode) on fake tensors.

    Parameters
    ----------
    preset : a :meth:`ursa_engine.ModelConfig.preset` name (ignored with ``root``)
    latents_shape : (T, H, W) or (H, W) latent grid, e.g. (13, 40, 64) for 49 × 320 × 512 video, (64, 64)
        for a 1024² IBQ image
    dtype : the engine's compute dtype (weights, activations, logits)
    cfg : guidance on (2B rows) or off (B rows)
    batch : B, prompts per call
    root : an URSA checkpoint root: its ``transformer/config.json``, ``scheduler/`` (codebook, α, c) and
        ``vae/config.json`` instead of a preset (the weights are not read)
    codebook : ``"fsq"`` (K = 64,000, the Cosmos video tokenizer), ``"ibq"`` (K = 131,072, m = 256, the
        IBQ1024 image tokenizer) or ``"auto"`` (ibq for a single latent frame of 64 × 64 or more, else fsq)
    prompt_length : padded prompt tokens (URSA: 320)
    head : the engine's ``head`` (``"auto"``: fused, as on a GPU with Triton)
    logits_budget, activation_budget : the engine's / model's budgets in bytes (None: no budget, one range / no
        sequence chunks)
    decode : plan the tokenizer's decode too
    granularity : allocation rounding (the CUDA caching allocator's 512 bytes)
    """
    from .. import _dispatch, ops_library
    from ..engine import Engine
    from ..graphs import LoopState
    from ..model import URSATransformer, latent_positions
    from ..scheduler import Scheduler

    t0 = time.perf_counter()
    T, H, W = (1, *latents_shape) if len(latents_shape) == 2 else tuple(latents_shape)
    if codebook == "auto":
        codebook = "ibq" if T == 1 and H * W >= 64 * 64 else "fsq"
    config, kind, make_path, tok_spec, name = _config_and_codebook(preset, root, codebook)
    path = make_path()
    sched = Scheduler(path, 50)
    K, n, B = config.lm_head_size, T * H * W, int(batch)
    rows = 2 * B if cfg else B
    L = prompt_length + 1 + n

    model = URSATransformer(config, dtype=dtype, device="meta", activation_budget=activation_budget)
    tok = None
    if decode and tok_spec is not None:
        with torch.device("meta"):
            tok = tok_spec[0](tok_spec[1]).to(dtype).eval()
    table = path.codebook.normalized if hasattr(path, "codebook") else None
    attn_name, attn_label, attn_expand, attend = planned_attention(model, dtype, rows, L)
    mem = LiveBytes(granularity=granularity, workspace=ops_library.workspace_buffers, watch=n * K)
    notes = []
    with FakeTensorMode(allow_non_fake_inputs=True), ops_library.as_gpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # latent frames left out by the authors' decode tiling: said in the notes
        with mem:
            with mem.phase("weights"):
                model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
                if tok is not None:
                    tok._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
                # the codebook's device copy (the real table stays on the host: the ops read it, not counted)
                table_dev = torch.empty(table.shape, dtype=table.dtype) if table is not None else None
            with mem.phase("inputs"):
                ids = torch.zeros((rows, L), dtype=torch.long)
                x = torch.zeros((B, n), dtype=torch.long)
                rope = model.rope_tables(latent_positions(prompt_length, (T, H, W)))
                seeds = torch.zeros(B, dtype=torch.long)
                k = torch.ones((), dtype=torch.long)  # a graph-style step: index in device memory
                engine = Engine(model, sched, mode="eager", head=head, logits_budget=logits_budget)
                opts = {"guidance_scale": 7.0 if cfg else 1.0, "guidance_trunc": 0.9, "temperature": 1.0,
                        "top_k": 0, "top_p": 1.0}
                state = LoopState(engine, sched, ids, x, rope, seeds, None, opts, False, n, B)
                engine.configure(state, rows)
            fused, backend, head_chunks = state.fused_head, state.backend, len(state.chunks(rows))
            head_step = state._head_step

            def phased_head_step(*args, **kwargs):
                with mem.phase("head + sampler"):
                    return head_step(*args, **kwargs)

            state._head_step = phased_head_step  # this plan's own state: the phase wraps each token range
            layers = model.model.layers
            # the whole loop body is the phase "step": what no nested phase claims (the body's own
            # buffers, the write-back) is its own; lm_head outside the head step (whole logits) is "lm_head"
            mem.watching = True
            with mem.phase("step"), attending(model, attend), \
                    mem.phase_of([model.model.embed_tokens, *layers, model.model.norm], "activations"), \
                    mem.phase_of([layer.self_attn for layer in layers], "attention"), \
                    mem.phase_of([layer.mlp for layer in layers], "mlp"), mem.phase_of([model.lm_head], "lm_head"):
                state.body(k, rows)
            mem.watching = False
            del state, engine
            tokens = x.view(B, T, H, W)
            if tok is not None:
                tok._check_ids = lambda ids: ids  # reads values, which fake tensors do not have
                with mem.phase("decode"):
                    tok.decode(tokens)
                notes.append(f"decode: {type(tok).__name__} (class defaults"
                             + (", IBQ1024 sizes" if kind == "ibq" and root is None else "") + ")")
            del table_dev
    chunks = model.activation_chunks(rows, L, dtype.itemsize) if activation_budget is not None else {}
    dk = n * K  # one sample's logits of one pass: the check is per pass, not 2·n·K under CFG
    phases = {}
    for key, stats in mem.phases.items():
        phases[_unstep(key)] = {"peak_bytes": stats.peak, "start_bytes": stats.start, "end_bytes": stats.end,
                                "largest": _unstepped(stats.largest), "most_elements": _unstepped(stats.most_elements),
                        "allocated_bytes": stats.allocated, "own_allocated_bytes": stats.own_allocated}
    dk_tensors = [_unstepped(t) for t in mem.big]
    dk_buffers = list(dict.fromkeys(t["phase"] for t in dk_tensors))
    weights = {"transformer": sum(_nbytes(p) for p in model.parameters()),
               "tokenizer": sum(_nbytes(p) for p in tok.parameters()) if tok is not None else 0,
               "codebook": _nbytes(table) if table is not None else 0}
    sampler = backend if backend != "auto" else _dispatch.auto_order(torch.device("cuda"))[0]
    plan = GenerationPlan(
        model=name, latents_shape=[T, H, W], batch=B, cfg=cfg, rows=rows, seq_len=L, latent_tokens=n,
        codebook=kind, codebook_size=K, dtype=str(dtype).replace("torch.", ""), path=type(path).__name__,
        head="fused" if fused else "chunked", sampler=sampler, head_chunks=head_chunks, logits_budget=logits_budget,
        activation_budget=activation_budget,
        mlp_chunks=len(chunks.get("mlp_chunks") or [0]), qkv_chunks=len(chunks.get("qkv_chunks") or [0]),
        tokenizer=type(tok).__name__ if tok is not None else None,
        attention=attn_label, attention_backend=attn_name, kv_expansion_bytes=attn_expand,
        peak_bytes=mem.peak, peak_phase=_unstep(mem.peak_at["phase"]), peak_op=mem.peak_at["op"],
        peak_tensors=[_unstepped(t) for t in mem.peak_tensors], weight_bytes=weights, phases=phases, dk_elements=dk,
        dk_buffers=dk_buffers,
        dk_tensors=dk_tensors, unphased_bytes=mem.unphased, granularity=granularity, notes=notes)
    plan.seconds = time.perf_counter() - t0
    return plan
