"""CUDA graphs of the continuous batch step, one per (rows, uncond rows, shape) bucket (issue 14, DESIGN §8).

A bucket pads the running rows to ``Rp`` (a power of two, at most the batcher's ``max_rows``) and
the guided rows' unconditional half to ``Gp``; the step is captured once per bucket and replayed
with every per-step value in device memory:

* static buffers: ids ``(Rp + Gp, L)``, tokens ``(Rp, n)``, each row's step ``k (Rp,)``, seeds
  ``(Rp,)`` and guidance decision ``guided (Rp,)``;
* the sampler is :func:`ursa_engine.rowwise.step_rows` with ``guided`` a device tensor (unguided
  rows get ``u = c``, exactly ``z = c``) and ``last=None`` (each row's ``k == N − 1`` decides on
  the device): nothing reads a device value on the host, no shape depends on data;
* padded rows (``R .. Rp``) hold valid inputs (step 0, seed 0) and are masked: their results are
  never copied back; padded uncond rows belong to unguided rows and are never read.

What the ops take as python scalars is part of the bucket's key: each row's scheduler, guidance
scale, temperature and filtering (:mod:`ursa_engine.rowwise`); a server whose requests share their
options keeps one graph per (Rp, Gp, shape). Graphs share one memory pool (replays never overlap;
every value that outlives a replay is a static buffer allocated outside the graphs) and the least
recently used bucket is dropped past ``max_graphs``. Replays give the eager step's tokens (a GPU
test: tests/test_serve_batcher.py).

Conditioning (DESIGN §2.4): a job's frozen tokens (given frames, inpainting's known tokens) are not
part of the captured step: :func:`ursa_engine.serve.step.forward_and_step` writes them back over the
job's rows of the replay's ``x_next``, as after an eager step, so conditioned and plain jobs share
buckets (no key of their own) and the tokens equal the eager step's (tests/test_serve_conditioning.py).

Previews (``preview_steps``): a step where any job of the bucket previews its x̂1 runs eagerly
(:meth:`GraphCache.usable`); the other steps of the same jobs replay as before.

Per-request LoRA adapters (DESIGN §9): the rows each adapter covers are python slices of the
captured step, so the (adapter, rows) runs and the batcher's adapter set (``RowAdapters.version``)
are part of the key too; traffic that mixes adapters in changing orders captures more buckets.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .. import ops_library
from ..graphs import cuda_graph_capture
from ..model import token_chunks


def _bucket(v: int, cap: int) -> int:
    return 0 if v == 0 else min(1 << (v - 1).bit_length(), max(cap, v))


class _Bucket:
    def __init__(self, batcher, rows: list, Rp: int, Gp: int, shape, L: int, pool):
        e = batcher.engine
        dev = e.device
        self.batcher, self.rows, self.Rp, self.Gp, self.n = batcher, rows, Rp, Gp, math.prod(shape)
        self.ids = torch.zeros(Rp + Gp, L, dtype=torch.int64, device=dev)
        self.x = torch.zeros(Rp, self.n, dtype=torch.int64, device=dev)
        self.x_next = torch.zeros_like(self.x)
        self.k = torch.zeros(Rp, dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(Rp, dtype=torch.int64, device=dev)
        self.guided = torch.zeros(Rp, dtype=torch.bool, device=dev)
        self.rope = None
        self.pool = pool
        self.replay = None
        self.loras: list = [None] * (Rp + Gp)  # each row's adapter in the captured step

    def body(self) -> None:
        """One step on the static buffers (captured): forward, head by token ranges, per-row step."""
        model, Rp, Gp, n = self.batcher.engine.model, self.Rp, self.Gp, self.n
        with self.batcher.loras.rows(self.loras):  # captured: the adapters' deltas on their rows
            hidden = model.hidden_states(self.ids, rope=self.rope, latent_tokens=n)
        K, itemsize = model.config.lm_head_size, model.dtype.itemsize
        for s, e in token_chunks(n, (Rp + Gp) * K * itemsize, self.batcher.engine.logits_budget):
            logits = model.lm_head(hidden[:, s:e])
            # row r's unconditional logits: row Rp + r for the first Gp rows, its own (unused) after
            uncond = torch.cat([logits[Rp:], logits[Gp:Rp]]) if Gp else None
            xs = self.x[:, s:e].contiguous()
            out = torch.empty_like(xs)
            for a, b, (sched, scales, temps, top_k, top_p, argmax_last) in self.rows:
                sched.step(logits[a:b], self.k[a:b], xs[a:b], uncond_logits=None if uncond is None else uncond[a:b],
                           guided=self.guided[a:b] if Gp else None, last=None, guidance_scale=scales,
                           temperature=temps, top_k=top_k, top_p=top_p, argmax_last=argmax_last,
                           seed=self.seeds[a:b], token_offset=s, backend=self.batcher.backend, validate=False,
                           out=out[a:b])
            self.x_next[:, s:e].copy_(out)


class GraphCache:
    """The captured buckets of one :class:`~ursa_engine.serve.batcher.Batcher` (CUDA engines)."""

    def __init__(self, batcher, max_graphs: int = 8):
        self.batcher, self.max_graphs = batcher, max_graphs
        self.buckets: OrderedDict = OrderedDict()
        self.pool = None
        self.captures = 0

    def capturable(self, jobs) -> bool:
        """Whether the step of ``jobs`` can be captured at all (a CUDA engine, no confidence sampler)."""
        return self.batcher.engine.device.type == "cuda" and all(j.sched.mask_sampler != "confidence" for j in jobs)

    def usable(self, jobs) -> bool:
        """Whether this step replays a graph: :meth:`capturable`, and no job previews this step (a
        preview draws x̂1 from the step's logits, which a replay never exposes: that step runs eagerly)."""
        return self.capturable(jobs) and not any(j.k + 1 in j.previews for j in jobs)

    def _layout(self, jobs, Rp: int):
        """Row runs (start, end, options) of one scheduler and filtering: the captured scalars."""
        slots = []
        for j in jobs:
            rq = j.request
            slots += [(j.sched, rq.guidance_scale, rq.temperature, rq.top_k, rq.top_p, rq.argmax_last)] * rq.n
        slots += [slots[0]] * (Rp - len(slots))  # padded rows: any valid options
        runs = []
        for r, (sched, gs, t, top_k, top_p, am) in enumerate(slots):
            if runs and runs[-1][2][0] is sched and runs[-1][2][3:] == (top_k, top_p, am):
                runs[-1][1] = r + 1
                runs[-1][2][1].append(gs)
                runs[-1][2][2].append(t)
            else:
                runs.append([r, r + 1, (sched, [gs], [t], top_k, top_p, am)])
        return [(a, b, opts) for a, b, opts in runs]

    def run(self, jobs, ids: torch.Tensor, x: torch.Tensor, G: int, rope) -> torch.Tensor:
        """The step of ``jobs`` (ordered as the batcher's rows: guided first) by a graph replay: x_next (R, n)."""
        b = self.batcher
        R, L = x.shape[0], ids.shape[1]
        Rp, Gp = _bucket(R, b.max_rows), _bucket(G, b.max_rows)
        layout = self._layout(jobs, Rp)
        cond = [lora for j in jobs for lora in [j.request.lora] * j.request.n]
        loras = cond + [None] * (Rp - R) + cond[:G] + [None] * (Gp - G)  # uncond row Rp + i: cond row i's
        key = (Rp, Gp, jobs[0].shape, L,
               tuple((a, c, id(o[0]), tuple(o[1]), tuple(o[2]), *o[3:]) for a, c, o in layout),
               b.loras.version, tuple(b.loras.runs(loras)))
        bucket = self.buckets.get(key)
        fresh = bucket is None
        if fresh:
            if self.pool is None:
                with ops_library.on_device(x.device):
                    self.pool = torch.cuda.graph_pool_handle()
            bucket = _Bucket(b, layout, Rp, Gp, jobs[0].shape, L, self.pool)
            bucket.rope, bucket.loras = rope, loras
        else:
            self.buckets.move_to_end(key)
        # inputs into the static buffers (host lists -> device copies, outside any capture)
        bucket.ids[:R].copy_(ids[:R])
        if G:
            bucket.ids[Rp : Rp + G].copy_(ids[R:])
        bucket.x[:R].copy_(x)
        ks, guided = [], []
        for j in jobs:
            ks += [j.k] * j.request.n
            guided += [bool(j.guided[j.k])] * j.request.n
        bucket.k[:R].copy_(torch.tensor(ks, dtype=torch.int64), non_blocking=False)
        bucket.k[R:].zero_()
        bucket.seeds[:R].copy_(torch.cat([j.seeds for j in jobs]))
        bucket.guided[:R].copy_(torch.tensor(guided, dtype=torch.bool))
        bucket.guided[R:].zero_()
        if fresh:  # cached only once captured: a failed capture leaves no bucket without a replay
            bucket.replay = cuda_graph_capture(bucket.body, self.pool, device=x.device)
            self.captures += 1
            self.buckets[key] = bucket
            while len(self.buckets) > self.max_graphs:
                self.buckets.popitem(last=False)
        with ops_library.on_device(x.device):  # the engine's device, whatever this thread's current one
            bucket.replay()
        return bucket.x_next[:R].clone()  # padded rows R .. Rp are masked: never copied back
