"""Generation on a dp × cfg × sp mesh: the same tokens as one process (issue 13, DESIGN §2.5, §4).

Every rank prepares the whole batch exactly as :meth:`Engine.generate` does
(:func:`ursa_engine.inputs.prepare_inputs`: prompt ids, per-sample seeds ``seed + b``, initial
tokens, conditioning frames: all cheap and deterministic), then:

* **dp**: rank ``d`` keeps samples ``[lo_d, hi_d)`` (near-equal parts) with their own seeds; the
  tokens are all-gathered at the end (every rank returns them; rank 0 decodes pixels);
* **cfg** (guided steps): cfg rank 0 runs the conditional rows, rank 1 the unconditional ones.
  The guided draw needs both halves' last hidden states or logits for each token. Per token the
  hidden state is ``hidden`` wide and the logits ``K`` wide (2,048 vs 64,000 at 1.7B: 31×), so the
  ranks exchange **final hidden states**: each rank draws one half of its tokens, sends the other
  half's hidden states to its peer and receives the peer's rows for its own half, then runs
  ``lm_head`` on both rows and the sampler. The head and the sampler are split between the two,
  not duplicated. Past ``guidance_trunc`` only the conditional rows run: the cfg × sp ranks shard
  them as one Ulysses group when ``cfg·sp`` divides the kv heads; otherwise both cfg ranks run the
  conditional forward and each draws half of the tokens;
* **sp** (Ulysses, :mod:`.ulysses`): positions split evenly across sp ranks; each rank runs the
  head and the sampler on the latent tokens its positions predict.

Every draw is keyed by (seed, step, global token index) (§2.5): a rank drawing tokens ``[s, e)``
of a sample steps them with ``token_offset=s`` and gets the single-process tokens. After each step
the new tokens are all-gathered in the cfg × sp group (int64, ``n`` per sample: small next to the
hidden states) so every rank holds the whole sequence of ids.

The exchange is one ``all_to_all_single`` of the cfg pair (each rank's split for itself is empty:
exactly the bytes of a send / receive pair) and the token gather one ``all_gather_single`` into a flat
buffer: both are collectives that NCCL and ``ProcessGroupNCCL`` capture in CUDA graphs. Graph mode
(``mode="graph"`` only: on a mesh ``"auto"`` runs eagerly until the NCCL capture has run on GPUs,
see :func:`_checks`) captures each rank's whole step, collectives included, once per layout (guided /
unguided) and replays it with the step index in device memory (:mod:`.graphs`); the last step runs
eagerly, as in one process. The fused head (``head="auto"`` on a GPU) and the fused samplers run
per rank as in one process; the sampler backend ``"auto"`` is resolved once, to rank 0's choice,
so every rank runs the same kernels (:func:`sampler_backend`).

Errors: a rank that raises alone would leave its peers blocked in their next collective. With
``validate_steps`` each eager step agrees on an error flag in the cfg × sp group before the token
gather, and every generation does once over the world before the final gather: all ranks raise
together (the failing rank its own error, the others a ValueError / RuntimeError naming it).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import _dispatch, ops_library
from ..attention import resolve_attention
from ..inputs import GenerationInputs, prepare_inputs
from ..model import latent_positions, sequence_ids, token_chunks
from ..paths import MaskPath, MetricPath, MixturePath
from ..results import GenerationResult, StepTimer, timed_decode
from . import graphs as pgraphs
from .mesh import Groups
from .ulysses import Shard, even_bounds, local_hidden


def _gather_padded(part: torch.Tensor, dim: int, width: int, group, size: int) -> torch.Tensor:
    """(size, ...): every rank's ``part`` zero-padded to ``width`` along ``dim``, in group rank order;
    one flat buffer (``all_gather_into_tensor``: a collective NCCL captures in CUDA graphs)."""
    shape = list(part.shape)
    shape[dim] = width
    pad = part.new_zeros(shape)
    pad.narrow(dim, 0, part.shape[dim]).copy_(part)
    parts = pad.new_empty(size, *shape)
    dist.all_gather_into_tensor(parts.view(-1, *shape[1:]), pad, group=group)
    return parts


def agree_on_errors(group, error: BaseException | None, device) -> None:
    """Collective over ``group`` (None: the world): if any rank's ``error`` is set, every rank raises
    (the failing rank its own error; the others a ValueError, or a RuntimeError when the failure was
    not one, naming the lowest failing rank), so no rank is left waiting in a collective."""
    code = 0 if error is None else 2 * (dist.get_world_size() - dist.get_rank()) + isinstance(error, ValueError)
    flag = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    code = int(flag.item())
    if error is not None:
        raise error
    if code:
        kind = ValueError if code % 2 else RuntimeError
        raise kind(f"mesh: rank {dist.get_world_size() - code // 2} raised an error during generation (see its "
                   "output); every rank of the mesh stops with it")


def sampler_backend(engine, groups: Groups, prep: GenerationInputs) -> str:
    """The engine's sampler backend with ``"auto"`` resolved once, identically on every rank: global
    rank 0's first backend of the one-process ``auto`` order able to run this path's step with these
    filters, broadcast (GPU timings remembered by one rank only must not make ranks differ)."""
    backend, sched = engine.sampler_backend, prep.sched
    if backend != "auto" or sched.mask_sampler == "confidence":
        return backend
    op = {MetricPath: "metric_step", MixturePath: "mixture_step", MaskPath: "mask_step"}[type(sched.path)]
    filt = dict(top_k=prep.opts["top_k"] or 0, top_p=prep.opts["top_p"])
    device = engine.device
    name = next(n for n in _dispatch.auto_order(device, op) if _dispatch.why_not(n, op, device, filt) is None)
    choice = torch.tensor([_dispatch.BACKENDS.index(name)], dtype=torch.int64, device=groups.device)
    dist.broadcast(choice, src=0)
    return _dispatch.BACKENDS[int(choice.item())]


def _halves(a: int, b: int) -> list[tuple[int, int]]:
    m = a + (b - a + 1) // 2
    return [(a, m), (m, b)]


class ParallelLoop:
    """One rank's part of a generation: its samples, its rows, its positions and its tokens."""

    def __init__(self, engine, groups: Groups, prep: GenerationInputs, argmax_last: bool):
        self.engine, self.groups, self.prep, self.argmax_last = engine, groups, prep, argmax_last
        model, lay = engine.model, groups.layout
        self.lo, self.hi = even_bounds(prep.B, lay.dp)[groups.dp_rank]  # may be empty (B < dp)
        lo, hi = self.lo, self.hi
        self.x = prep.x[lo:hi].clone()  # (Bl, n): every rank keeps its samples' whole sequence
        self.seeds = prep.seeds[lo:hi].contiguous()
        self.freeze = None if prep.freeze is None else (prep.freeze[0], prep.freeze[1][lo:hi])
        rows = [prep.cond[lo:hi]] + ([prep.neg[lo:hi]] if prep.neg is not None else [])
        self.ids = [sequence_ids(r, self.x, model.config) for r in rows]  # cond (, uncond): (Bl, L) each
        self.P = prep.cond.shape[1]
        L = self.P + 1 + prep.n
        self.cos, self.sin = model.rope_tables(latent_positions(self.P, prep.shape, device=engine.device))
        self.sp_shard = Shard.even(L, groups.sp_rank, lay.sp, groups.sp) if lay.sp > 1 else None
        hkv = model.config.num_key_value_heads
        wide = lay.cfg > 1 and hkv % groups.wide_size == 0
        self.wide_shard = Shard.even(L, groups.wide_rank, groups.wide_size, groups.wide) if wide else None
        sp_bounds = Shard.even(L, 0, lay.sp, None).bounds
        self.sp_ranges = [self._latent(b) for b in sp_bounds]
        self.wide_ranges = [self._latent(b) for b in Shard.even(L, 0, groups.wide_size, None).bounds]
        self.fused = engine._fused_head(prep)
        self.common = dict(argmax_last=argmax_last, seed=self.seeds, backend=sampler_backend(engine, groups, prep),
                           validate=engine.validate_steps, **prep.opts)

    def _latent(self, bounds: tuple[int, int]) -> tuple[int, int]:
        s, e = bounds
        n = self.prep.n
        a, b = min(max(s - self.P, 0), n), min(max(e - self.P, 0), n)
        return a, max(a, b)

    def plan(self, guided: bool):
        """(shard, row ids, draw ranges of every wide rank, exchange with the cfg peer?) of a step."""
        g, lay = self.groups, self.groups.layout
        halves = [h for c in range(2) for h in (_halves(*r)[c] for r in self.sp_ranges)]  # wide rank c·sp + j
        if guided and lay.cfg == 2:
            return self.sp_shard, self.ids[g.cfg_rank], halves, True
        if guided:
            return self.sp_shard, torch.cat(self.ids), self.sp_ranges, False
        if lay.cfg == 2 and self.wide_shard is not None:
            return self.wide_shard, self.ids[0], self.wide_ranges, False
        if lay.cfg == 2:  # kv heads do not split cfg·sp ways: both run the cond rows, each draws half
            return self.sp_shard, self.ids[0], halves, False
        return self.sp_shard, self.ids[0], self.sp_ranges, False

    def hidden(self, guided: bool):
        """Final hidden states of the tokens this rank draws: (cond (Bl, e − s, H), uncond or None, s, e, ranges)."""
        shard, ids, ranges, exchange = self.plan(guided)
        g, Bl = self.groups, self.hi - self.lo
        model = self.engine.model
        h = local_hidden(model, ids, self.cos, self.sin, shard, pad_id=model.config.pad_token_id)
        start = 0 if shard is None else shard.start
        s, e = ranges[g.wide_rank]
        mine = h[:, self.P + s - start : self.P + e - start]
        if not exchange:
            return (mine[:Bl], mine[Bl:] if ids.shape[0] > Bl else None, s, e, ranges)
        ps, pe = ranges[(1 - g.cfg_rank) * g.layout.sp + g.sp_rank]  # the peer's half of the same positions
        H, peer = h.shape[-1], 1 - g.cfg_rank
        send = h[:, self.P + ps - start : self.P + pe - start].reshape(-1)  # (Bl·(pe − ps)·H,) contiguous
        recv = h.new_empty(Bl * (e - s) * H)
        # a send / receive pair as the cfg group's all-to-all (nothing to itself): a collective both
        # ranks always call, which NCCL captures in CUDA graphs like the Ulysses all-to-all
        splits_in, splits_out = [0, 0], [0, 0]
        splits_in[peer], splits_out[peer] = send.numel(), recv.numel()
        dist.all_to_all_single(recv, send, output_split_sizes=splits_out, input_split_sizes=splits_in, group=g.cfg)
        recv = recv.view(Bl, e - s, H)
        cond, uncond = (mine, recv) if g.cfg_rank == 0 else (recv, mine)
        return cond, uncond, s, e, ranges

    def step(self, k, guided: bool) -> None:
        """One denoising step of this rank's samples; every rank ends with the new tokens in ``x``
        and ``ids`` (in place: static buffers of a captured step). ``k``: a python int (eager) or
        a 0-dim int64 device tensor (the body of a CUDA graph: no host sync, nothing validated)."""
        hc, hu, s, e, ranges = self.hidden(guided)
        new = self.x.new_empty(self.x.shape[0], e - s)
        g = self.groups
        # validated eager steps agree on errors before the gather: a rank raising alone would hang its peers
        agree = self.common["validate"] and not isinstance(k, torch.Tensor) and g.wide_size > 1
        error = None
        try:
            if e > s:
                self._draw(hc, hu, k, s, e, new)
        except Exception as err:
            if not agree:
                raise
            error = err
        if agree:
            agree_on_errors(g.wide, error, g.device)
        x_next = self._gather(new, ranges)
        if self.freeze is not None:
            mask, values = self.freeze
            x_next = torch.where(mask, values, x_next)
        self.x.copy_(x_next)
        shift, n = self.engine.model.config.lm_vocab_size, self.prep.n
        for ids in self.ids:
            ids[:, -n:].copy_(self.x).add_(shift)

    def _draw(self, hc, hu, k, s: int, e: int, new: torch.Tensor) -> None:
        """Head + sampler on tokens [s, e) of every local sample, by ranges within the logits budget."""
        model, sched = self.engine.model, self.prep.sched
        graph = isinstance(k, torch.Tensor)  # the RNG step and t, h, β, β̇ are read from device memory
        common = dict(self.common, validate=self.common["validate"] and not graph)
        rng_step = k.reshape(1) if graph else sched.step_values(hc.device)[1][k : k + 1]
        argmax = self.argmax_last and not graph and k == sched.num_steps - 1
        rows, K = hc.shape[0] * (2 if hu is not None else 1), model.config.lm_head_size
        per_token = ops_library.head_draw_scratch(hc.shape[0], K) if self.fused else rows * K * model.dtype.itemsize
        for c0, c1 in token_chunks(e - s, per_token, self.engine.logits_budget):
            gs, ge = s + c0, s + c1
            x = self.x[:, gs:ge]
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            if self.fused:
                H = hc.shape[-1]
                x1 = ops_library.head_draw(
                    hc[:, c0:c1].reshape(-1, H), model.lm_head.weight,
                    uncond_hidden=None if hu is None else hu[:, c0:c1].reshape(-1, H),
                    guidance_scale=self.prep.opts["guidance_scale"], temperature=self.prep.opts["temperature"],
                    seeds=self.seeds, row_len=ge - gs, step=rng_step, index_offset=gs, argmax=argmax)
                sched.step(None, k, x, x1=x1.view(x.shape), token_offset=gs, out=out, **common)
            else:
                logits = model.lm_head(hc[:, c0:c1])
                uncond = None if hu is None else model.lm_head(hu[:, c0:c1])
                sched.step(logits, k, x, uncond_logits=uncond, token_offset=gs, out=out, **common)
            new[:, c0:c1] = out

    def _gather(self, part: torch.Tensor, ranges, group=None, size=None) -> torch.Tensor:
        """(Bl, n, ...) from every wide rank's ``part`` (Bl, e_w − s_w, ...) of ``ranges``."""
        g = self.groups
        if g.wide_size == 1:
            return part
        width = max(1, max(e - s for s, e in ranges))
        parts = _gather_padded(part, 1, width, g.wide, g.wide_size)
        out = part.new_empty(part.shape[0], self.prep.n, *part.shape[2:])
        for (s, e), p in zip(ranges, parts, strict=True):
            out[:, s:e] = p[:, : e - s]
        return out

    def logits(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole (Bl, n, K) cond (and uncond) logits of the current tokens as this layout
        computes them (gathered; for tests and debugging: a (rows, n, K) tensor per rank)."""
        hc, hu, s, e, ranges = self.hidden(guided)
        head = self.engine.model.lm_head
        cond = self._gather(head(hc), ranges)
        return cond, None if hu is None else self._gather(head(hu), ranges)


def gather_samples(groups: Groups, local: torch.Tensor, B: int) -> torch.Tensor:
    """(B, ...) on every rank from each dp rank's (hi − lo, ...) samples."""
    parts = even_bounds(B, groups.layout.dp)
    if groups.dp is None:
        return local
    width = max(1, max(hi - lo for lo, hi in parts))
    gathered = _gather_padded(local, 0, width, groups.dp, groups.layout.dp)
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(gathered, parts, strict=True)])


def _checks(engine, groups: Groups, prep, mode) -> str:
    """Layout checks; the resolved mode ("graph": CUDA, a sampler taking tensor step indices)."""
    if prep.sched.mask_sampler == "confidence" and groups.wide_size > 1:
        raise ValueError(f"mesh: the confidence sampler ranks a sample's tokens together, so they must stay on one "
                         f"rank; {groups.layout} splits them (use dp only)")
    mode = mode or engine.mode
    if mode == "auto":
        # NCCL collectives captured in CUDA graphs have not run on hardware yet (no GPU lent):
        # a mesh runs eagerly unless graph mode is asked for (tests/test_distributed.py, gpu mark)
        return "eager"
    return engine._resolve_mode(mode, prep.sched)  # the one-process rules and errors


@torch.no_grad()
def generate(engine, groups: Groups, prompt_ids, negative_prompt_ids=None, latents_shape=(1, 40, 64), *,
             guidance_scale: float = 7.0, guidance_trunc: float = 0.9, num_steps=None, shift=None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, argmax_last: bool = False, seed: int = 0,
             motion=None, cond_latents=None, cond_indices=None, cond_noise_scale: float = 0.0, freeze_cond=False,
             latents=None, progress: bool = False, mode=None, image=None, video=None, num_cond_frames=None,
             decode: bool = True, keep_graphs=None, prompt_length=None, known_tokens=None,
             known_mask=None) -> GenerationResult:
    """:meth:`Engine.generate` on the engine's mesh (same arguments and result). Every rank returns
    the whole batch's tokens; ``frames`` are decoded on global rank 0 only (None elsewhere).
    Frozen tokens (``freeze_cond`` frames, ``known_tokens`` under ``known_mask``): every rank holds
    the (1, n) mask and its dp slice of the values, written after each step's gather.

    Graph mode: each rank captures its step, collectives included (:mod:`.graphs`); every rank of
    the mesh must make the same calls with the same arguments (as for eager collectives), so that
    the ranks capture, replay, keep and release their graphs together. Graphs with captured NCCL
    operations hold their communicators: call ``engine.release_graphs()`` before
    ``torch.distributed.destroy_process_group()``.
    """
    t_start = time.perf_counter()
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prep = prepare_inputs(engine, prompt_ids, negative_prompt_ids, latents_shape, guidance_scale=guidance_scale,
                   guidance_trunc=guidance_trunc, num_steps=num_steps, shift=shift, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, motion=motion, cond_latents=cond_latents,
                   cond_indices=cond_indices, cond_noise_scale=cond_noise_scale, freeze_cond=freeze_cond,
                   latents=latents, image=image, video=video, num_cond_frames=num_cond_frames,
                   prompt_length=prompt_length, known_tokens=known_tokens, known_mask=known_mask)
    mode = _checks(engine, groups, prep, mode)
    loop = ParallelLoop(engine, groups, prep, argmax_last)
    runner = None
    if mode == "graph" and loop.hi > loop.lo:  # a dp slice without samples runs no step at all
        runner = pgraphs.runner_for(engine, loop)
        loop = runner.state  # the captured buffers, holding this call's inputs
    timer, times, calls = StepTimer(device), [], 0
    N = prep.sched.num_steps
    show = progress and groups.rank == 0
    error = None
    try:
        for k in tqdm(range(N), disable=not show, desc="denoising", unit="step"):
            timer.start()
            if not (prep.skip_first and k == 0) and loop.hi > loop.lo:  # a dp slice without samples idles
                if runner is not None and k < N - 1:  # the last step takes a python int (argmax_last)
                    runner.replay(k, prep.guided[k])
                else:
                    loop.step(k, prep.guided[k])
                calls += 1
            times.append(timer.stop())
    except Exception as err:
        error = err
    agree_on_errors(None, error, groups.device)  # before the gather: no rank waits there for a failed one
    tokens = gather_samples(groups, loop.x, prep.B).view(prep.B, *prep.shape).clone()
    model = engine.model
    result = GenerationResult(
        tokens=tokens, step_times=timer.resolve(times),
        peak_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        model_calls=calls, guided_steps=sum(prep.guided), mode=mode,
        attention=resolve_attention(model.attn_backend, device, model.dtype, model.config.head_dim))
    del loop, runner
    decoding = decode and engine.vae is not None  # the same on every rank (only rank 0 decodes): see Engine
    if engine._graphs and not (keep_graphs if keep_graphs is not None else not decoding):
        engine.release_graphs()
    if decoding and groups.rank == 0:
        result.frames, result.decode_time, result.decode_peak_memory = timed_decode(engine.decode, engine.vae.device,
                                                                                     result.tokens)
    result.total_time = time.perf_counter() - t_start
    return result
