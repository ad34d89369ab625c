"""One denoising step as a replayable body, and its CUDA graphs (DESIGN §8).

:class:`LoopState` holds the static buffers of one generation (ids, tokens, seeds, rope tables,
frozen frames) and runs one whole step on them: transformer, sampler, new tokens written back
into the ids. Eager mode calls :meth:`LoopState.body` with a python step index; graph mode
captures the same body once per batch layout (2B rows with guidance, B without) with the step
index in a device tensor, so one graph serves every step and the sampler reads t, h, β, β̇ and
the RNG step from device memory (:class:`GraphRunner`). Replays produce the eager tokens.
"""

from __future__ import annotations

import torch


class LoopState:
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


def cuda_graph_capture(fn, pool):
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


class GraphRunner:
    """CUDA graphs of :meth:`LoopState.body` for 2B and B rows, sharing one memory pool.

    The pool is shared safely: every value that outlives a replay (ids, x, seeds, rope tables, the
    frozen frames) is a static buffer allocated outside the graphs, and replays never overlap.
    """

    def __init__(self, state: LoopState):
        self.state = state
        self.k = torch.zeros((), dtype=torch.int64, device=state.x.device)
        self.pool = torch.cuda.graph_pool_handle() if state.x.is_cuda else None
        self.graphs: dict[int, object] = {}

    def load(self, state: LoopState) -> None:
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
        replay = cuda_graph_capture(lambda: s.body(self.k, rows), self.pool)
        s.ids.copy_(saved[0])  # the warm-up steps changed the state; capture itself ran nothing
        s.x.copy_(saved[1])
        return replay

    def replay(self, k: int, rows: int) -> None:
        replay = self.graphs.get(rows)
        if replay is None:
            replay = self.graphs[rows] = self._capture(rows)
        self.k.fill_(k)  # per-step values are read from device memory by the captured sampler
        replay()
