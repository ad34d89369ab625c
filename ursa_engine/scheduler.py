"""The sampling scheduler (DESIGN §2.4): time grid, one Euler step, and its exact law."""

from __future__ import annotations

import math

import torch

from . import _dispatch, _validate, rowwise
from ._dispatch import resolve
from .paths import MaskPath, MetricPath, MixturePath
from .reference import laws
from .reference.rng import seeds_per_row
from .reference.sampler import NUM_PARAMS, P_BETA, P_BETA_DOT, P_H, P_RATE, mask_confidence_step
from .schedules import shift_time


class Scheduler:
    """Euler sampler over the grid ``t_k = shift(k / N)``, ``k = 0..N`` (``t_N = 1``).

    Parameters
    ----------
    path : MetricPath | MixturePath | MaskPath
    num_steps : int
        N, the number of model evaluations.
    shift : float
        Resolution shift λ (§2.2).
    mask_sampler : {"euler", "confidence"}
        For the masked path: the Euler step of §2.4, or MaskGIT's confidence ranking.
    confidence_temperature : float
        MaskGIT's Gumbel temperature at step 0, annealed linearly to 0.
    """

    def __init__(self, path, num_steps: int, shift: float = 1.0, *, mask_sampler: str = "euler",
                 confidence_temperature: float = 4.5):
        if not isinstance(path, (MetricPath, MixturePath, MaskPath)):
            raise TypeError(f"path: expected a MetricPath, MixturePath or MaskPath, got {type(path).__name__}")
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
        if mask_sampler not in ("euler", "confidence"):
            raise ValueError(f"mask_sampler: expected 'euler' or 'confidence', got {mask_sampler!r}")
        if mask_sampler == "confidence" and not isinstance(path, MaskPath):
            raise ValueError("mask_sampler: 'confidence' needs a MaskPath")
        self.path, self.num_steps = path, num_steps
        self.shift = _validate.positive("shift", shift)
        self.mask_sampler = mask_sampler
        self.confidence_temperature = _validate.finite("confidence_temperature", confidence_temperature)
        grid = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        self.times = shift_time(grid, self.shift)
        self.times[-1] = 1.0
        self._params64 = self._step_table()
        self._params = self._params64.to(torch.float32)  # what the kernels read
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._error_cache: dict[str, torch.Tensor] = {}
        self._time_cache: dict[str, torch.Tensor] = {}

    def _step_table(self) -> torch.Tensor:
        """Per-step values (N, NUM_PARAMS) float64: h, β, β̇ and κ̇/(1−κ) at t_k."""
        table = torch.zeros(self.num_steps, NUM_PARAMS, dtype=torch.float64)
        t = self.times
        table[:, P_H] = t[1:] - t[:-1]
        if isinstance(self.path, MetricPath):
            table[:, P_BETA] = self.path.beta(t[:-1])
            table[:, P_BETA_DOT] = self.path.beta_dot(t[:-1])
        else:
            table[:, P_RATE] = torch.tensor([self.path.rate(float(v)) for v in t[:-1]], dtype=torch.float64)
        return table

    def step_values(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step table and step counters on ``device`` (cached): graph-safe inputs."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = (self._params.to(device),
                                       torch.arange(self.num_steps, dtype=torch.int64, device=device))
        return self._device_cache[key]

    def time_values(self, device) -> torch.Tensor:
        """The grid ``t_0..t_N`` (float64) on ``device`` (cached): per-row guidance decisions."""
        key = str(torch.device(device))
        if key not in self._time_cache:
            self._time_cache[key] = self.times.to(device)
        return self._time_cache[key]

    # ------------------------------------------------------------------ step
    def _check_k(self, k, validate: bool) -> int | torch.Tensor:
        if isinstance(k, torch.Tensor):
            if k.dtype != torch.int64 or k.numel() != 1:
                raise ValueError(f"k: a tensor step index must be one int64 value, got {k.dtype} {tuple(k.shape)}")
            if validate and not 0 <= int(k) < self.num_steps - 1:
                raise ValueError(f"k: a tensor step index must be in [0, {self.num_steps - 1}) (the last step "
                                 f"takes a python int), got {int(k)}")
            return k
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.num_steps:
            raise ValueError(f"k: must be an int in [0, {self.num_steps}), got {k!r}")
        return k

    def _options(self, logits, uncond_logits, k, x, x1, guidance_scale, guidance_trunc, temperature, top_k, top_p):
        """Check types, shapes and options (values are checked later, by the path that reads them);
        return (logits, uncond after truncation, uncond as given, x, x1, kernel options)."""
        K = self.path.size
        x = _validate.tokens("x", x, K, values=False)
        shape = tuple(x.shape)
        if x1 is not None:
            x1 = _validate.tokens("x1", x1, K, values=False, device=x.device)
            if tuple(x1.shape) != shape:
                raise ValueError(f"x1: shape {tuple(x1.shape)} does not match tokens {shape}")
        if x1 is None or logits is not None:
            logits = _validate.logits("logits", logits, shape, K, device=x.device, values=False)
        if uncond_logits is not None:
            uncond_logits = _validate.logits("uncond_logits", uncond_logits, shape, K, device=x.device, values=False)
            if logits is not None and uncond_logits.dtype != logits.dtype:
                raise TypeError(f"uncond_logits: dtype {uncond_logits.dtype} differs from logits {logits.dtype}")
        given_uncond = uncond_logits
        guidance_scale = _validate.finite("guidance_scale", guidance_scale)
        guidance_trunc = _validate.finite("guidance_trunc", guidance_trunc)
        temperature = _validate.positive("temperature", temperature)
        top_k, top_p = _validate.filtering(top_k, top_p, K)
        # Guidance truncation (§2.4): past t_k >= trunc the conditional logits alone are used.
        # With a tensor k the caller decides (it chose whether to compute uncond_logits at all).
        if uncond_logits is not None and not isinstance(k, torch.Tensor):
            if self.times[k] >= guidance_trunc:
                uncond_logits = None
        opts = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        return logits, uncond_logits, given_uncond, x, x1, opts

    def _check_values(self, x, x1, logits, uncond) -> None:
        """The torch value checks (host syncs; no (D, K) temporary): ids, then the logits the step reads."""
        K = self.path.size
        _validate.token_values("x", x, K)
        if x1 is not None:
            _validate.token_values("x1", x1, K)
            return  # given x̂1, the step reads no logits
        _validate.logit_values("logits", logits)
        if uncond is not None:
            _validate.logit_values("uncond_logits", uncond)

    def _error_buffer(self, device: torch.device) -> torch.Tensor:
        """The int32 (1,) ``error=`` buffer of the fused ops on ``device`` (cached), zeroed."""
        key = str(device)
        if key not in self._error_cache:
            self._error_cache[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return self._error_cache[key].zero_()

    def step(self, logits, k, x, *, uncond_logits=None, guidance_scale: float = 1.0,
             guidance_trunc: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             argmax_last: bool = False, seed=0, token_offset: int = 0, x1: torch.Tensor | None = None,
             backend: str = "auto", validate: bool = True, out: torch.Tensor | None = None,
             guided=None, last=None) -> torch.Tensor:
        """One sampling step from ``x = x_{t_k}`` (DESIGN §2.4).

        Parameters
        ----------
        logits : Tensor S + (K,), or None when ``x1`` is given
            Conditional logits for every token (bf16 / fp16 / fp32).
        k : int, 0-dim int64 device tensor, or (B,) int64 device tensor (per-row steps)
            Step index in [0, N). A tensor index reads t, h, β, β̇ from device memory (for CUDA
            graphs): guidance then applies iff ``uncond_logits`` is given, and the last step
            (k = N − 1) must be a python int. A (B,) tensor (B = S[0] > 1, or B = 1 with a seed
            tensor) gives every sample its own step: see :func:`ursa_engine.rowwise.step_rows`
            (per-row ``guidance_scale`` / ``guidance_trunc`` / ``temperature``, ``guided``,
            ``last``; per-sample seeds required; continuous batching, issue 14).
        x : LongTensor S
            Current tokens.
        uncond_logits : Tensor S + (K,), optional
            Unconditional logits; guidance ``z = u + s·(c − u)`` while ``t_k < guidance_trunc``.
        temperature, top_k, top_p : filtering of z before the x̂1 draw (top_k = 0, top_p = 1: off).
        argmax_last : bool
            On the last step return argmax z instead of a draw ("churning by argmax").
        seed : int or int64 tensor (S[0],)
            RNG key (§2.5): one int, or one seed per sample (results then do not depend on the
            batch a sample is generated in). Draws use TAG_STEP and the step index k.
        token_offset : int
            The position of ``x``'s first token in its sample: a chunk ``x[:, s:e]`` of every
            sample (with its logits and per-sample seeds) stepped with ``token_offset=s`` gives
            exactly the tokens ``[s, e)`` of the whole step (Philox index ``i + s``, §2.5). Not
            meaningful for the confidence sampler, whose ranking couples a sample's tokens.
        x1 : LongTensor S, optional
            x̂1 already drawn (the fused lm_head + draw): the step reads no logits (``logits``
            may be None; guidance, temperature and filtering are ignored) and does the rest of
            §2.4 as usual. Not for the confidence sampler (it ranks by log p(x̂1)).
        backend : {"auto", "torch", "triton", "native"}
        validate : bool
            Check token ranges and NaN / +inf / all −inf logits, raising a ValueError naming
            the argument and writing nothing. The torch backend runs the torch checks first;
            fused backends check inside the op (an error buffer read after it, no extra pass
            over the logits; one host sync either way). False: nothing checked (CUDA graphs).
        out : LongTensor S, optional
            Written in place (may be ``x`` itself).
        guided, last : per-row steps only (see :func:`ursa_engine.rowwise.step_rows`)

        Returns
        -------
        LongTensor S: x_{t_{k+1}}.
        """
        if isinstance(k, torch.Tensor) and rowwise.is_per_row(k, x, seed):
            return rowwise.step_rows(
                self, logits, k, x, uncond_logits=uncond_logits, guided=guided, last=last,
                guidance_scale=guidance_scale, guidance_trunc=guidance_trunc, temperature=temperature, top_k=top_k,
                top_p=top_p, argmax_last=argmax_last, seed=seed, token_offset=token_offset, x1=x1, backend=backend,
                validate=validate, out=out)
        if guided is not None or last is not None:
            raise ValueError("guided / last: apply to per-row steps only (k a (B,) int64 tensor)")
        k = self._check_k(k, validate)
        token_offset = _validate.index_offset("token_offset", token_offset)
        logits, uncond, given_uncond, x, x1, opts = self._options(
            logits, uncond_logits, k, x, x1, guidance_scale, guidance_trunc, temperature, top_k, top_p)
        shape, device = tuple(x.shape), x.device
        if out is None:
            out = torch.empty(shape, dtype=torch.int64, device=device)
        elif out.shape != x.shape or out.dtype != torch.int64 or out.device != device or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous int64 tensor of shape {shape} on {device}")
        seeds, row_len = seeds_per_row(seed, shape, device)
        params_all, counters = self.step_values(device)
        if isinstance(k, torch.Tensor):
            if k.device != device:
                raise ValueError(f"k: on {k.device}, but the tokens are on {device}")
            kk = k.reshape(1)
            params, step, is_last = params_all.index_select(0, kk).view(-1), kk, False
        else:
            params, step, is_last = params_all[k], counters[k:k + 1], k == self.num_steps - 1
        if self.mask_sampler == "confidence":
            if backend not in ("auto", "torch"):
                raise RuntimeError(f"backend={backend!r} cannot run the confidence sampler: its top-n "
                                   "selection per sample runs on the torch backend only")
            if x1 is not None:
                raise ValueError("x1: the confidence sampler ranks tokens by log p(x̂1): it needs the logits")
            if validate:
                self._check_values(x, None, logits, given_uncond)
            K = self.path.size
            flat = dict(cond=logits.reshape(-1, K).contiguous(),
                        uncond=None if uncond is None else uncond.reshape(-1, K).contiguous(),
                        x=x.reshape(-1).contiguous())
            return self._confidence_step(flat, k, shape, seeds, row_len, step, opts, argmax_last, out, token_offset)
        return self._apply(logits, uncond, given_uncond, x, x1, opts, params, step, is_last, argmax_last, seeds,
                           row_len, token_offset, backend, validate, out)

    def _apply(self, logits, uncond, given_uncond, x, x1, opts, params, step, last, argmax_last, seeds, row_len,
               token_offset, backend, validate, out):
        """The checked step of :meth:`step` (not the confidence sampler) with the step's ``params``
        (NUM_PARAMS,) and RNG ``step`` counter (1,) on the device: one backend op writes ``out``."""
        K, device = self.path.size, x.device
        flat_x = x.reshape(-1).contiguous()
        op = {MetricPath: "metric_step", MixturePath: "mixture_step", MaskPath: "mask_step"}[type(self.path)]
        extra = {}
        if token_offset:  # only non-default keywords: backends that predate them keep working
            extra["index_offset"] = token_offset
        if x1 is not None:
            extra["x1"] = x1.reshape(-1).contiguous()
            cond = flat_uncond = None
            opts = dict(opts, top_k=0, top_p=1.0)  # no logits read: no filtering to support
        else:
            cond = logits.reshape(-1, K).contiguous()
            flat_uncond = None if uncond is None else uncond.reshape(-1, K).contiguous()
        name, fn = self._backend_op(op, backend, device, (x.numel(), K), opts, extra)
        fused_check = validate and name != "torch"  # the fused ops check the values themselves (error=)
        if validate and not fused_check:
            self._check_values(x, x1, logits, given_uncond)
        flat_out = out.view(-1)
        target = flat_out
        if fused_check:
            # the op writes a scratch result: nothing reaches ``out`` unless the values were good
            target = torch.empty_like(flat_out)
            extra["error"] = self._error_buffer(device)
            if x1 is not None and op != "metric_step":  # no logits: K tells the op the id range
                extra["K"] = K
        common = dict(seeds=seeds, row_len=row_len, last=last, argmax_last=argmax_last, out=target, **opts, **extra)
        if op == "metric_step":
            table = self.path.codebook.normalized_on(device)
            fn(cond, flat_uncond, flat_x, table, params, step, power=self.path.power,
               levels=self.path.codebook.levels, **common)
        elif op == "mixture_step":
            fn(cond, flat_uncond, flat_x, params, step, **common)
        else:
            fn(cond, flat_uncond, flat_x, params, step, mask_id=self.path.mask_id, **common)
        if fused_check:
            _validate.raise_for_errors(int(extra["error"].item()), K=K, x=x, x1=x1)
            flat_out.copy_(target)
        return out

    @staticmethod
    def _backend_op(op: str, backend: str, device, shape, opts: dict, extra: dict):
        """(name, op) of the backend that runs this call (every backend's step ops take the keywords of
        ``extra``: ``index_offset``, ``x1``, ``error``, ``K``); ``auto`` takes the first of its order
        that supports the filtering options (torch always does)."""
        filt = dict(top_k=opts["top_k"], top_p=opts["top_p"])
        if backend == "auto":
            for name in _dispatch.auto_order(device, op, shape):
                if _dispatch.why_not(name, op, device, filt) is None:
                    return name, resolve(op, name, device, shape=shape, **filt)
        return backend, resolve(op, backend, device, shape=shape, **filt)

    def _confidence_step(self, flat, k, shape, seeds, row_len, step, opts, argmax_last, out, token_offset=0):
        if isinstance(k, torch.Tensor):
            raise ValueError("k: the confidence sampler takes a python int step index")
        rows = shape[0] if len(shape) > 1 else 1
        length = flat["x"].numel() // max(rows, 1)
        K = self.path.size
        n = math.ceil(float(self.path.kappa(float(self.times[k + 1]))) * length - 1e-9)
        # at least one more token per step while any remain masked (MaskGIT)
        unmasked = (flat["x"].view(rows, length) != self.path.mask_id).sum(-1)
        n_unmasked = torch.clamp(torch.maximum(unmasked + 1, torch.full_like(unmasked, n)), max=length)
        last = k == self.num_steps - 1
        noise = self.confidence_temperature * (1 - (k + 1) / self.num_steps)
        cond = flat["cond"].view(rows, length, K)
        uncond = None if flat["uncond"] is None else flat["uncond"].view(rows, length, K)
        new = mask_confidence_step(cond, uncond, flat["x"].view(rows, length), mask_id=self.path.mask_id,
                                   n_unmasked=n_unmasked, noise_scale=noise, seeds=seeds, row_len=row_len,
                                   step=step.reshape(-1)[0], index_offset=token_offset,
                                   argmax=last and argmax_last, **opts)
        out.view(-1).copy_(new.view(-1))
        return out

    def draw(self, logits, k: int, x, *, uncond_logits=None, guidance_scale: float = 1.0,
             guidance_trunc: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             argmax_last: bool = False, seed=0, token_offset: int = 0, backend: str = "auto",
             validate: bool = True) -> torch.Tensor:
        """x̂1 alone: the draw :meth:`step` makes at step ``k`` (same uniforms, lane 0 of §2.5), on any backend.

        ``step(logits, k, x, ...)`` equals ``step(None, k, x, x1=draw(logits, k, x, ...))`` token for
        token (up to §2.5's float ties between backends). Runs the backend's step op as a last step
        (whose result is x̂1) with the RNG step counter of ``k``; for the masked path on a grid of
        masks, so that every token's x̂1 comes back. ``k`` is a python int; arguments as :meth:`step`.
        Returns a LongTensor shaped like ``x``.
        """
        if self.mask_sampler == "confidence":
            raise ValueError("draw: the confidence sampler ranks a sample's tokens together; it has no per-token "
                             "x̂1 step")
        k = self._check_k(k, True)
        token_offset = _validate.index_offset("token_offset", token_offset)
        logits, uncond, given_uncond, x, _, opts = self._options(
            logits, uncond_logits, k, x, None, guidance_scale, guidance_trunc, temperature, top_k, top_p)
        if validate:  # x is read below only through its shape (every token is drawn)
            _validate.token_values("x", x, self.path.size)
        source = torch.full_like(x, self.path.mask_id) if isinstance(self.path, MaskPath) else x
        seeds, row_len = seeds_per_row(seed, tuple(x.shape), x.device)
        params_all, counters = self.step_values(x.device)
        out = torch.empty(tuple(x.shape), dtype=torch.int64, device=x.device)
        return self._apply(logits, uncond, given_uncond, source, None, opts, params_all[k], counters[k:k + 1], True,
                           argmax_last and k == self.num_steps - 1, seeds, row_len, token_offset, backend, validate,
                           out)

    def tune(self, logits, x, *, uncond_logits=None, **options) -> str | None:
        """On a GPU, time one step with each fused backend able to run it (Triton, native) and
        let ``backend="auto"`` use the faster at this (tokens, K) from then on. Synchronizes:
        call it at warm-up, outside CUDA-graph capture. Returns the choice (None on the CPU)."""
        if x.device.type != "cuda" or self.mask_sampler == "confidence":
            return None
        op = {MetricPath: "metric_step", MixturePath: "mixture_step", MaskPath: "mask_step"}[type(self.path)]
        filt = dict(top_k=options.get("top_k", 0) or 0, top_p=options.get("top_p", 1.0))
        k = min(1, self.num_steps - 1)  # a mid-path step: the metric codebook pass runs
        out = torch.empty_like(x)
        calls = {name: (lambda name=name: self.step(logits, k, x, uncond_logits=uncond_logits, backend=name,
                                                     validate=False, out=out, **options))
                 for name in ("triton", "native") if _dispatch.why_not(name, op, x.device, filt) is None}
        if len(calls) < 2:
            return next(iter(calls), None)
        return _dispatch.tune(op, x.device, (x.numel(), self.path.size), calls)

    # ------------------------------------------------------------------ exact law
    def step_probs(self, logits, k, x, *, uncond_logits=None, guidance_scale: float = 1.0,
                   guidance_trunc: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, argmax_last: bool = False, x1: torch.Tensor | None = None, seed=None,
                   token_offset=None, backend=None, out=None, validate=None) -> torch.Tensor:
        """Exact law of :meth:`step`'s result (§2.4): float64 of shape S + (K,). Small K only
        (the metric law costs O(D·K²)). With ``x1``: the law given x̂1 = x1 (``logits`` may be
        None). Accepts and ignores ``seed`` / ``token_offset`` / ``backend`` / ``out`` /
        ``validate`` (the law does not depend on them) so that one option dict serves both calls."""
        if self.mask_sampler == "confidence":
            raise NotImplementedError("step_probs: the confidence sampler couples tokens (top-n "
                                      "selection) and has no per-token law")
        if not isinstance(k, int):
            raise ValueError(f"k: step_probs takes a python int, got {type(k).__name__}")
        k = self._check_k(k, True)
        logits, uncond, given_uncond, x, x1, opts = self._options(
            logits, uncond_logits, k, x, x1, guidance_scale, guidance_trunc, temperature, top_k, top_p)
        self._check_values(x, x1, logits, given_uncond)
        K = self.path.size
        cond = None if x1 is not None else logits.reshape(-1, K)
        uncond = None if x1 is not None or uncond is None else uncond.reshape(-1, K)
        flat_x = x.reshape(-1)
        last = k == self.num_steps - 1
        p = self._params64[k]
        common = dict(last=last, argmax_last=argmax_last, x1=None if x1 is None else x1.reshape(-1), **opts)
        if isinstance(self.path, MetricPath):
            law = laws.metric_step_probs(cond, uncond, flat_x, self.path.codebook.normalized_on(x.device),
                                         h=float(p[P_H]), beta=float(p[P_BETA]), beta_dot=float(p[P_BETA_DOT]),
                                         power=self.path.power, **common)
        elif isinstance(self.path, MixturePath):
            law = laws.mixture_step_probs(cond, uncond, flat_x, h=float(p[P_H]), rate=float(p[P_RATE]), K=K,
                                          **common)
        else:
            law = laws.mask_step_probs(cond, uncond, flat_x, mask_id=self.path.mask_id, h=float(p[P_H]),
                                       rate=float(p[P_RATE]), K=K, **common)
        return law.view(*x.shape, K)

    def __repr__(self):
        return f"Scheduler({self.path!r}, num_steps={self.num_steps}, shift={self.shift})"
