"""CUDA graphs of the parallel step (issue 13, DESIGN §8): each rank captures its whole step once
per layout, collectives included, and replays it with the step index in device memory.

As in one process (:mod:`ursa_engine.graphs`): :class:`ParallelGraphRunner` is a
:class:`~ursa_engine.graphs.GraphRunner` whose state is the rank's
:class:`~ursa_engine.distributed.generate.ParallelLoop`. Its static buffers (ids of each half,
tokens, seeds, rope tables, frozen frames) are allocated before capture; one graph per layout of
a step: guided (cfg exchange, or the 2·Bl rows) and unguided (the conditional rows, sharded over
the wide group when it can be), the parallel counterparts of the one-process 2B / B layouts. The
step index lives in the runner's 0-dim int64 tensor, so one graph serves every step, and the
sampler (and the fused head) read t, h, β, β̇ and the RNG step from device memory. The last step
runs eagerly (it takes a python int: ``argmax_last``).

The collectives of a step (Ulysses ``all_to_all_single`` of heads, the cfg pair's
``all_to_all_single`` of hidden states, the ``all_gather_single`` of new tokens) are captured
inside the graph: NCCL ≥ 2.9 captures collectives and P2P (CUDA ≥ 11.3), and ``ProcessGroupNCCL``
supports it (PyTorch ≥ 2.2: no watchdog work is enqueued while a stream captures, and capture
starts only once the watchdog's queue is empty). What it needs, and how it is met here:

* the communicators exist before capture: :func:`ursa_engine.graphs.cuda_graph_capture` runs the
  step twice on a side stream first, which creates each group's communicator and makes the
  send / receive connections that NCCL then needs for a capture in the default (global) mode;
* no host sync in the step: ``wait()`` of a NCCL work is a stream wait (keep
  ``TORCH_NCCL_BLOCKING_WAIT`` unset) and nothing is validated in captured steps;
* only collectives: the cfg exchange is an all-to-all of the pair, not ``isend`` / ``irecv`` /
  ``batch_isend_irecv``, whose capture has failed in several PyTorch releases (pytorch#133984,
  pytorch#148462);
* capture and replay are collective: every rank of a group captures the same operations and
  replays together. Every rank runs the same steps in the same order with the same layouts, so
  they capture the same graphs at the same step, and cache or release them together;
* graphs that captured NCCL operations hold their communicators: release them
  (``engine.release_graphs()``) before ``destroy_process_group()``, or the communicator's
  destruction waits for them.
"""

from __future__ import annotations

from .. import graphs, ops_library


class ParallelGraphRunner(graphs.GraphRunner):
    """The graphs of one rank's :class:`~ursa_engine.distributed.generate.ParallelLoop`, keyed by
    the layout of a step (``guided``), sharing one memory pool."""

    def load(self, loop) -> None:
        """Reuse the captured graphs for a new generation with the same key: copy its inputs into
        the captured buffers (same shapes; other values, and the new rope of another (T, H, W))."""
        s = self.state
        s.x.copy_(loop.x)
        s.seeds.copy_(loop.seeds)
        s.cos.copy_(loop.cos)
        s.sin.copy_(loop.sin)
        for mine, theirs in zip(s.ids, loop.ids, strict=True):
            mine.copy_(theirs)
        if s.freeze is not None:
            s.freeze[0].copy_(loop.freeze[0])
            s.freeze[1].copy_(loop.freeze[1])
        # python-level options of this call (guidance_trunc, argmax_last: read by the eager last step)
        s.prep, s.argmax_last, s.common = loop.prep, loop.argmax_last, dict(loop.common, seed=s.seeds)

    def _capture(self, guided: bool):
        s = self.state
        saved = [t.clone() for t in (s.x, *s.ids)]
        self.k.fill_(0)
        with ops_library.on_device(self.device):  # cuda_graph_capture captures on the current device
            replay = graphs.cuda_graph_capture(lambda: s.step(self.k, guided), self.pool)
        for t, v in zip((s.x, *s.ids), saved, strict=True):  # the warm-up steps changed the state
            t.copy_(v)
        return replay


def graph_key(loop) -> tuple:
    """What a captured parallel step depends on besides the values of its static buffers."""
    engine, model, o = loop.engine, loop.engine.model, loop.prep.opts
    return ("parallel", id(loop.groups), id(loop.prep.sched), tuple(loop.x.shape), tuple(loop.ids[0].shape),
            len(loop.ids), loop.freeze is not None, o["guidance_scale"], o["temperature"], o["top_k"], o["top_p"],
            loop.common["backend"], loop.fused, engine.logits_budget, model.attn_backend, model.ops_backend,
            model.dtype, model.activation_budget)


def runner_for(engine, loop) -> ParallelGraphRunner:
    """The engine's cached runner for ``loop``'s key, loaded with ``loop``'s inputs, or a new one
    (one cached key at a time, as in :meth:`Engine._graph_runner`: graphs hold their memory pools)."""
    key = graph_key(loop)
    runner = engine._graphs.get(key)
    if runner is None:
        engine._graphs.clear()
        runner = engine._graphs[key] = ParallelGraphRunner(loop)
    else:
        runner.load(loop)
    return runner
