"""Spies on the batcher's forward passes and sampler calls (tests/test_serve.py, tests/test_serve_batcher.py):
evidence that batching happened, read from what the model and the scheduler were actually given."""

from __future__ import annotations

import threading

import torch

from ursa_engine.scheduler import Scheduler


class ForwardSpy:
    """Records every transformer forward pass the server's batcher runs (the worker thread).

    Wraps ``model.hidden_states`` (the forward: input ids in, hidden states out) and the batcher's
    step (which jobs, at which step index ``k``, are in the pass). For each pass: ``rows`` (the
    forward's own batch), ``jobs`` [(id, k, n, guided)] and ``prompts``: the distinct prompt ids
    of the conditional rows, read from the forward's input. ``hold``: block the first pass until
    :attr:`go` is set (so that a second request is queued while the first one runs)."""

    def __init__(self, batcher, model, monkeypatch, *, hold: bool = False):
        self.passes, self._jobs, self.hold = [], None, hold
        self.entered, self.go = threading.Event(), threading.Event()
        forward, step = model.hidden_states, batcher._forward_and_step

        def spy_step(jobs):
            self._jobs = [(j.id, j.k, j.request.n, bool(j.guided[j.k])) for j in jobs]
            try:
                return step(jobs)
            finally:
                self._jobs = None

        def spy_forward(ids, *args, **kw):
            if self._jobs is not None:
                R = sum(n for _, _, n, _ in self._jobs)
                P = ids.shape[1] - 1 - kw["latent_tokens"]  # [prompt, BOV, latents]
                self.passes.append(dict(rows=ids.shape[0], jobs=self._jobs,
                                        prompts={tuple(r.tolist()) for r in ids[:R, :P]}))
                if self.hold and not self.entered.is_set():
                    self.entered.set()
                    self.go.wait(30)
            return forward(ids, *args, **kw)

        monkeypatch.setattr(batcher, "_forward_and_step", spy_step)
        monkeypatch.setattr(model, "hidden_states", spy_forward)

    def shared(self) -> list[dict]:
        """Passes that carried the rows of two or more requests (distinct prompts in the forward's input)."""
        return [p for p in self.passes if len({j[0] for j in p["jobs"]}) >= 2 and len(p["prompts"]) >= 2]


class SamplerSpy:
    """Records every :meth:`Scheduler.step` call (any scheduler): ``rows`` (the logits' batch) and
    ``ks``, the step indices of the call (one for a scalar k, the rows' own for a (B,) tensor) and
    ``forward``: the index of the forward pass of ``forward`` (a :class:`ForwardSpy`) it follows."""

    def __init__(self, monkeypatch, forward: ForwardSpy | None = None):
        self.calls = []
        step = Scheduler.step

        def spy_step(sched, logits, k, x, **kw):
            ks = sorted(set(k.tolist())) if isinstance(k, torch.Tensor) and k.ndim == 1 else [int(k)]
            self.calls.append(dict(rows=x.shape[0], ks=ks, forward=len(forward.passes) - 1 if forward else None))
            return step(sched, logits, k, x, **kw)

        monkeypatch.setattr(Scheduler, "step", spy_step)
