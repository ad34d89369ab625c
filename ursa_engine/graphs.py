"""One denoising step as a replayable body, and its CUDA graphs (DESIGN §8).

:class:`LoopState` holds the static buffers of one generation (ids, tokens, seeds, rope tables,
frozen tokens: conditioning frames and inpainting's known tokens) and runs one whole step on them:
transformer, head + sampler, new tokens written back into the ids.

Head and sampler run in token chunks (issue 11): the transformer returns the final hidden states
of the latent-predicting positions, then for each range ``[s, e)`` of tokens (every sample's, cond
and uncond rows together) ``lm_head`` on that range and :meth:`Scheduler.step` with
``token_offset=s``. Every draw is keyed by (seed, step, token index, lane) (§2.5), so the tokens
are those of the unchunked step; the (rows, n, K) logits never exist, only one range's (the
engine's ``logits_budget``). With the fused head (``ursa_engine.triton_kernels.head_draw``) the logits are
not written at all: x̂1 comes from the head kernel and the step gets ``x1=``. The MaskGIT
confidence sampler ranks a sample's tokens against each other: it runs unchunked (whole logits).

Eager mode calls :meth:`LoopState.body` with a python step index; graph mode captures the same
body once per batch layout (2B rows with guidance, B without) with the step index in a device
tensor, so one graph serves every step and the sampler reads t, h, β, β̇ and the RNG step from
device memory (:class:`GraphRunner`). Replays produce the eager tokens. Capture, its streams and
replays happen on the engine's device, whichever device is current (issue 12).
"""

from __future__ import annotations

import torch

from . import ops_library
from .model import token_chunks
from .trajectory import logits_x1_logprobs, step_logprobs


class LoopState:
    """The buffers of one generation: ids (rows, L), tokens x (B, n), and one eager step."""

    def __init__(self, engine, sched, ids, x, rope, seeds, freeze, opts, argmax_last, n, B):
        self.engine, self.sched, self.ids, self.x, self.rope = engine, sched, ids, x, rope
        self.seeds, self.freeze, self.opts, self.argmax_last, self.n, self.B = seeds, freeze, opts, argmax_last, n, B
        self.x_next = torch.empty_like(x)
        self.shift = engine.model.config.lm_vocab_size
        self.backend = engine.sampler_backend  # the concrete one: set by Engine._sampler_backend
        self.fused_head = False  # x̂1 from the fused head kernel: set by Engine._fused_head
        self.recorder = None  # a trajectory.TrajectoryRecorder when the generation records (eager steps only)
        self.ops_backend = None  # the model's norm / RoPE / SwiGLU backend for this generation (None: the model's)

    def graph_key(self):
        """What a captured body depends on. The frozen tokens (conditioning frames, ``known_tokens``)
        enter only as whether there are any: their (1, n) mask and (B, n) values are static buffers that
        :meth:`GraphRunner.load` copies, so another mask or other values replay the same graphs."""
        o = self.opts
        return (id(self.sched), tuple(self.ids.shape), self.n, self.B, self.freeze is not None, o["guidance_scale"],
                o["temperature"], o["top_k"], o["top_p"], self.backend, self.fused_head, self.engine.logits_budget,
                self.engine.model.attn_backend, self.engine.model.ops_backend, self.engine.model.dtype,
                self.engine.model.activation_budget)

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        """Token ranges of the head + sampler for ``rows`` rows, each within the logits budget.

        Unfused: a range's (rows, e − s, K) logits. Fused: nothing of size K per token is written;
        a range holds the kernel's scratch (per-(token, 128 codes) max and sum).
        """
        K, itemsize = self.engine.model.config.lm_head_size, self.engine.model.dtype.itemsize
        per_token = ops_library.head_draw_scratch(self.B, K) if self.fused_head else rows * K * itemsize
        return token_chunks(self.n, per_token, self.engine.logits_budget)

    def body(self, k, rows: int) -> None:
        """Transformer on ``rows`` rows, head + sampler step by token ranges, tokens written back: one whole step."""
        B, model = self.B, self.engine.model
        graph = isinstance(k, torch.Tensor)
        common = dict(argmax_last=self.argmax_last, seed=self.seeds, backend=self.backend,
                      validate=self.engine.validate_steps and not graph, **self.opts)
        if self.sched.mask_sampler == "confidence":  # ranks a sample's tokens together: whole logits
            logits = model(self.ids[:rows], rope=self.rope, latent_tokens=self.n)  # (rows, n, K)
            self.sched.step(logits[:B], k, self.x, uncond_logits=logits[B:] if rows > B else None,
                            out=self.x_next, **common)
        else:
            hidden = model.hidden_states(self.ids[:rows], rope=self.rope, latent_tokens=self.n,
                                         ops_backend=self.ops_backend)  # (rows, n, H)
            for s, e in self.chunks(rows):
                self._head_step(hidden[:, s:e], k, rows, s, e, common)
        if self.recorder is not None:  # the law given x̂1 of the sampler's own output (before frozen write-back)
            step_lp = step_logprobs(self.sched, k, self.x, self.recorder.x1, self.x_next)
        if self.freeze is not None:
            mask, values = self.freeze
            torch.where(mask, values, self.x_next, out=self.x_next)
        if self.recorder is not None:
            if self.freeze is not None:
                step_lp = step_lp.masked_fill(self.freeze[0], 0.0)  # given tokens are not actions
            self.recorder.add(k, float(self.sched.times[k]), rows > B, self.x, self.x_next, step_lp)
        self.x.copy_(self.x_next)
        for r in range(self.ids.shape[0] // B):  # every half sees the new tokens
            self.ids[r * B : (r + 1) * B, -self.n :].copy_(self.x).add_(self.shift)  # in place (no out= view)

    def _head_step(self, hidden, k, rows: int, s: int, e: int, common: dict) -> None:
        """Tokens [s, e) of every sample: hidden (rows, e − s, H) -> x_next[:, s:e]."""
        B, model = self.B, self.engine.model
        x, out = self.x[:, s:e], self.x_next[:, s:e]
        target = out if out.is_contiguous() else torch.empty_like(x)  # the scheduler writes contiguous rows
        if self.recorder is not None:
            x1 = self._recorded_draw(hidden, k, rows, s, e, common)
            self.sched.step(None, k, x, x1=x1, token_offset=s, out=target, **common)
        elif self.fused_head:
            H = hidden.shape[-1]
            x1 = ops_library.head_draw(
                hidden[:B].reshape(-1, H), model.lm_head.weight,
                uncond_hidden=hidden[B:].reshape(-1, H) if rows > B else None,
                guidance_scale=self.opts["guidance_scale"], temperature=self.opts["temperature"], seeds=self.seeds,
                row_len=e - s, step=self._rng_step(k), index_offset=s,
                argmax=self.argmax_last and not isinstance(k, torch.Tensor) and k == self.sched.num_steps - 1)
            self.sched.step(None, k, x, x1=x1.view(B, e - s), token_offset=s, out=target, **common)
        else:
            logits = model.lm_head(hidden)  # (rows, e − s, K): one range of the logits
            self.sched.step(logits[:B], k, x, uncond_logits=logits[B:] if rows > B else None, token_offset=s,
                            out=target, **common)
        if target is not out:
            out.copy_(target)

    def _recorded_draw(self, hidden, k: int, rows: int, s: int, e: int, common: dict) -> torch.Tensor:
        """x̂1 (B, e − s) of tokens [s, e) and its log-probability, both written into the recorder
        (issue 18): the fused head's ``logprobs=`` output, or the sampler backend's own draw
        (:meth:`Scheduler.draw`) and the log-softmax of the same range's logits."""
        B, model, rec = self.B, self.engine.model, self.recorder
        argmax = self.argmax_last and k == self.sched.num_steps - 1
        if self.fused_head:
            H = hidden.shape[-1]
            lp = torch.empty(B * (e - s), dtype=torch.float32, device=hidden.device)
            x1 = ops_library.head_draw(
                hidden[:B].reshape(-1, H), model.lm_head.weight,
                uncond_hidden=hidden[B:].reshape(-1, H) if rows > B else None,
                guidance_scale=self.opts["guidance_scale"], temperature=self.opts["temperature"], seeds=self.seeds,
                row_len=e - s, step=self._rng_step(k), index_offset=s,
                argmax=argmax, logprobs=lp).view(B, e - s)
        else:
            logits = model.lm_head(hidden)  # (rows, e − s, K)
            cond, uncond = logits[:B], logits[B:] if rows > B else None
            x1 = self.sched.draw(cond, k, self.x[:, s:e], uncond_logits=uncond, token_offset=s, **common)
            lp = logits_x1_logprobs(self.sched, cond, uncond, x1, self.opts)
        rec.x1[:, s:e] = x1.view(B, e - s)
        rec.x1_logprobs[:, s:e] = 0.0 if argmax else lp.view(B, e - s)  # argmax: a deterministic choice
        return x1.view(B, e - s)

    def _rng_step(self, k) -> torch.Tensor:
        """The RNG step counter (1,) int64 on the device: the scheduler's, read inside the kernels."""
        if isinstance(k, torch.Tensor):
            return k.reshape(1)
        return self.sched.step_values(self.x.device)[1][k : k + 1]


def cuda_graph_capture(fn, pool, device=None):
    """Warm ``fn`` up on a side stream (Triton compilation, cuDNN plans), capture it into a CUDA
    graph drawing on ``pool``; return the replay callable.

    Everything happens on ``device`` (default: the current one): the side stream and the capture
    stream are made there, explicitly (``torch.cuda.graph``'s default capture stream is created
    once per process on whichever device was current then), and ``fn`` runs with it current.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    with ops_library.on_device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=device)):
            fn()
    return graph.replay


class GraphRunner:
    """CUDA graphs of :meth:`LoopState.body` for 2B and B rows, sharing one memory pool.

    The pool is shared safely: every value that outlives a replay (ids, x, seeds, rope tables, the
    frozen frames) is a static buffer allocated outside the graphs, and replays never overlap.
    """

    def __init__(self, state: LoopState):
        self.state = state
        self.device = state.x.device  # the engine's: capture, pool and replays happen there
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
        with ops_library.on_device(self.device):  # cuda_graph_capture captures on the current device
            replay = cuda_graph_capture(lambda: s.body(self.k, rows), self.pool)
        s.ids.copy_(saved[0])  # the warm-up steps changed the state; capture itself ran nothing
        s.x.copy_(saved[1])
        return replay

    def replay(self, k: int, rows: int) -> None:
        replay = self.graphs.get(rows)
        if replay is None:
            replay = self.graphs[rows] = self._capture(rows)
        self.k.fill_(k)  # per-step values are read from device memory by the captured sampler
        with ops_library.on_device(self.device):  # launched on the engine's device's current stream
            replay()
