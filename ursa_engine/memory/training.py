"""Planned peak memory of one training step at real size, computed on the CPU (issue 18, item 3).

:func:`plan_training_step` runs one steady-state training step of an URSA transformer —
``LatentLoss(model)(prompt_ids, x_t, x1)`` (DESIGN §3), its backward and, optionally, a
mixed-precision AdamW update — on ``FakeTensorMode`` tensors, weights included, with
:class:`~.tracker.LiveBytes` counting every live storage. Backend choices are those of a CUDA
device (:func:`ursa_engine.ops_library.as_gpu`): the loss runs whatever its ``backend="auto"``
picks there (the fused linear cross-entropy custom op where registered, whose fake allocates what
the kernel returns and whose scratch is declared by :func:`ursa_engine.ops_library.workspace_buffers`;
else the chunked torch twin); the model's norm / RoPE / SwiGLU run in plain torch (``LatentLoss``'s
``ops_backend`` for training); attention is what :func:`ursa_engine.attention.resolve_attention`
picks on a CUDA device (:mod:`.attention`): flash-attn (GQA native) when importable, else SDPA's
fused kernels (output and log-sum-exp saved for the backward, no L × L buffer) with k / v expanded
to the query heads as on CUDA, those bytes counted (and saved for the backward).

What one step is (the steady state, step ≥ 2 of a loop):

* resident before the step: the parameters (``dtype``), and with ``optimizer="adamw"`` the fp32
  moments ``exp_avg`` / ``exp_avg_sq`` (8 bytes a parameter) and, when ``master_weights`` (default:
  any ``dtype`` below fp32), an fp32 master copy of the parameters (4 more): 2 + 12 bytes a
  parameter in bf16;
* ``forward``: the transformer up to the final norm (``activation checkpointing``: each decoder
  layer keeps only its input; :attr:`ursa_engine.URSATransformer.gradient_checkpointing`);
* ``loss``: the ``lm_head`` + cross-entropy (the chunked twin computes both gradients here);
* ``backward``: ``loss.backward()`` (the layers' recomputation included), gradients in ``dtype``
  (``p.grad`` as autograd accumulates it);
* ``optimizer``: :func:`adamw_step` — parameter by parameter, in chunks of
  :data:`OPTIMIZER_CHUNK` elements (fp32 scratch of two chunks, a fused kernel's working set; the
  default ``torch.optim.AdamW(foreach=True)`` instead makes fp32 temporaries of whole parameter
  groups), then the gradients are dropped (``zero_grad(set_to_none=True)``).

The **(n, K) check**: n = latent tokens of one sample, K = the codebook size; every storage
created by the step (forward, loss, backward, optimizer; not the resident weights and states) of
n·K elements or more is listed in ``nk_buffers``, and so is every declared kernel workspace tensor
of n·K elements or more (:func:`ursa_engine.ops_library.workspace_buffers`). Issue 18's goal: none.
The check cannot tell logits from a parameter's gradient when a parameter has n·K elements or
more (tiny models only): the plan says so in its notes.

Figures are live bytes as ``torch.cuda.memory_allocated`` would count them (blocks of 512 bytes),
minus kernel scratch no op declares (cuBLAS, flash-attn tiles) and the CUDA context.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .attention import attending, planned_attention
from .tracker import CUDA_GRANULARITY, LiveBytes

STEP_PHASES = ("forward", "loss", "backward", "optimizer")
PHASES = ("weights", "optimizer state", "inputs", "forward", "forward/attention", "forward/mlp", "loss", "backward",
          "backward/attention", "backward/mlp", "optimizer")
OPTIMIZER_CHUNK = 2**24  # elements of one parameter updated at once by adamw_step (two fp32 chunks: 128 MiB)
OPTIMIZERS = ("adamw", None)


# ------------------------------------------------------------------------------------- the optimizer
def adamw_state(params: Iterable[torch.Tensor], *, master_weights: bool) -> list[dict]:
    """AdamW state of each parameter: fp32 ``exp_avg`` and ``exp_avg_sq`` (zeros) and, with
    ``master_weights``, ``master``: an fp32 copy of the parameter that :func:`adamw_step` updates
    (the parameter then receives its rounded value)."""
    states = []
    for p in params:
        st = {"exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
              "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device)}
        if master_weights:
            st["master"] = p.detach().to(torch.float32, copy=True)
        states.append(st)
    return states


@torch.no_grad()
def adamw_step(params: list[torch.Tensor], states: list[dict], *, step: int, lr: float = 1e-4,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
               chunk: int = OPTIMIZER_CHUNK) -> None:
    """One AdamW update (decoupled weight decay, bias-corrected; ``torch.optim.AdamW``'s formula) in place.

    Per parameter with a gradient, ``chunk`` elements at a time: the gradient chunk in fp32,
    ``m ← lerp(m, g, 1 − β1)``, ``v ← β2 v + (1 − β2) g²``, ``w ← w (1 − lr·wd) − lr/(1 − β1^t) ·
    m / (√(v / (1 − β2^t)) + eps)``, on the fp32 master copy when the state has one (then copied
    into the parameter). Scratch: two fp32 chunks. ``step`` is t, counted from 1.

    Parameters
    ----------
    params : contiguous parameters (any float dtype); those whose ``.grad`` is None are skipped
    states : :func:`adamw_state` of ``params``, same order
    """
    if step < 1:
        raise ValueError(f"step: counted from 1, got {step}")
    if len(params) != len(states):
        raise ValueError(f"states: {len(states)} for {len(params)} parameters")
    b1, b2 = betas
    bias1, bias2_sqrt = 1 - b1**step, math.sqrt(1 - b2**step)
    for p, st in zip(params, states, strict=True):
        if p.grad is None:
            continue
        if not p.is_contiguous():
            raise ValueError(f"params: expected contiguous parameters, got strides {p.stride()}")
        g, m, v = p.grad.reshape(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
        master = st.get("master")
        w = master.view(-1) if master is not None else p.detach().view(-1)
        for s in range(0, g.numel(), chunk):
            e = min(s + chunk, g.numel())
            gc = g[s:e].float()  # no copy when the gradient is fp32
            m[s:e].lerp_(gc, 1 - b1)
            v[s:e].mul_(b2).addcmul_(gc, gc, value=1 - b2)
            denom = v[s:e].sqrt().div_(bias2_sqrt).add_(eps)
            w[s:e].mul_(1 - lr * weight_decay).addcdiv_(m[s:e], denom, value=-lr / bias1)
            del gc, denom
            if master is not None:
                p.detach().view(-1)[s:e].copy_(w[s:e])


# ------------------------------------------------------------------------------------- the plan
@dataclass
class TrainingPlan:
    """Planned live bytes of one training step (see the module docstring). Bytes include the resident
    weights and optimizer state unless the name says ``above_resident``."""

    model: str
    config: dict  # hidden_size, num_hidden_layers, lm_head_size, parameters
    latents_shape: list[int]
    batch: int
    prompt_length: int
    seq_len: int  # L = P + 1 + n
    latent_tokens: int  # n = T·H·W, a sample
    codebook_size: int  # K
    dtype: str
    checkpointing: bool
    optimizer: str | None
    master_weights: bool
    loss: str  # the loss module and the custom ops it ran
    attention: str
    peak_bytes: int  # the most live bytes, resident included
    peak_above_resident_bytes: int  # the step's own peak: peak_bytes − resident_bytes
    resident_bytes: int  # weights + optimizer state, live before the step
    peak_phase: str  # forward | loss | backward | optimizer
    peak_at: dict  # {"phase" (nested name), "module", "op"}
    peak_tensors: list[dict]
    weight_bytes: int
    gradient_bytes: int  # every p.grad after the backward
    optimizer_state_bytes: int  # moments (+ master copy)
    input_bytes: int
    saved_bytes: int  # live after the loss, above the start of the forward: what the backward reads
    phases: dict  # name -> {"peak_bytes", "start_bytes", "end_bytes", "largest", "most_elements"}
    nk_elements: int  # n·K
    nk_buffers: list[dict]  # storages (and declared workspaces) of the step with >= n·K elements
    largest_parameter_elements: int
    custom_ops: dict  # phase -> ursa custom ops that ran in it
    flops: int | None  # counted by FlopCounterMode (custom ops not included)
    flops_by_op: dict = field(default_factory=dict)
    forward_flops: float = 0.0  # ModelConfig.forward_flops (DESIGN §6 counting) of the same sequences
    granularity: int = CUDA_GRANULARITY
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    attention_backend: str = ""  # what ursa_engine.attention picks on a CUDA device
    kv_expansion_bytes: int = 0  # k / v expanded to the query heads by SDPA on CUDA, a layer (counted)

    @property
    def has_nk_buffer(self) -> bool:
        return bool(self.nk_buffers)

    def to_dict(self) -> dict:
        return {**asdict(self), "has_nk_buffer": self.has_nk_buffer}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A text table: peak and largest tensor of every phase, resident bytes, the (n, K) verdict."""
        lines = [f"training plan: {self.model}, latents {'x'.join(map(str, self.latents_shape))} (n = "
                 f"{self.latent_tokens:,} a sample, L = {self.seq_len:,}), batch {self.batch}, {self.dtype}, "
                 f"K = {self.codebook_size:,}",
                 f"activation checkpointing: {'on' if self.checkpointing else 'off'}; optimizer: "
                 f"{self.optimizer or 'none'}" + (" (fp32 master weights)" if self.master_weights else "")
                 + f"; loss: {self.loss}",
                 "custom ops: " + ("; ".join(f"{k}: {', '.join(v)}" for k, v in self.custom_ops.items()) or "none"),
                 f"{'phase':<22}{'peak':>12}  largest tensor",
                 "-" * 96]
        for name in PHASES:
            p = self.phases.get(name)
            if p is None:
                continue
            big = p["largest"]
            what = f"{_gb(big['bytes'])} {tuple(big['shape'])} {big['dtype']} ({big['op']})" if big else "-"
            lines.append(f"{name:<22}{_gb(p['peak_bytes']):>12}  {what}")
        lines.append("-" * 96)
        lines.append(f"{'peak':<22}{_gb(self.peak_bytes):>12}  in {self.peak_at['phase']!r} at {self.peak_at['op']}"
                     f" ({_gb(self.peak_above_resident_bytes)} above the resident {_gb(self.resident_bytes)})")
        lines.append(f"weights {_gb(self.weight_bytes)}, optimizer state {_gb(self.optimizer_state_bytes)}, "
                     f"gradients {_gb(self.gradient_bytes)}, saved for the backward {_gb(self.saved_bytes)}")
        if self.flops:
            lines.append(f"FLOPs counted: {self.flops / 1e12:.1f} T (forward alone, docs/design.md §6: "
                         f"{self.forward_flops / 1e12:.1f} T)")
        verdict = ("none" if not self.nk_buffers else
                   "; ".join(f"{b['phase']}: {tuple(b['shape'])} {b['dtype']} ({b['op']})" for b in self.nk_buffers))
        lines.append(f"(n, K) buffers (>= {self.nk_elements:,} elements): {verdict}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class _StepBytes(LiveBytes):
    """LiveBytes (watching storages and declared workspace tensors of ``watch`` elements or more)
    that also lists the ``ursa`` custom ops run in each top-level phase."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.custom_ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "ursa":
            self.custom_ops.setdefault(self._phases[0] if self._phases else "", set()).add(str(func.name()))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels, not the CPU ones a fake CPU run picks
_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
          torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def _values_unchecked() -> Iterator[None]:
    """The loss's id range check reads values (one host sync), which fake tensors do not have."""
    from ..training import losses

    check = losses._check_ids
    losses._check_ids = lambda *named: None
    try:
        yield
    finally:
        losses._check_ids = check


def plan_training_step(config="ursa-1.7b", latents_shape=(13, 40, 64), *, batch: int = 1,
                       dtype: torch.dtype = torch.bfloat16, prompt_length: int = 320, checkpointing: bool = True,
                       optimizer: str | None = "adamw", master_weights: bool | None = None,
                       loss: Callable[[nn.Module], nn.Module] | None = None, gpu: bool = True,
                       count_flops: bool = True, granularity: int = CUDA_GRANULARITY,
                       name: str | None = None) -> TrainingPlan:
    """Plan the live bytes of one training step of ``loss(model)(prompt_ids, x_t, x1)`` on fake tensors.

    Parameters
    ----------
    config : a :class:`ursa_engine.ModelConfig` or a preset name (``"ursa-1.7b"``: K = 64,000, the FSQ
        video codebook)
    latents_shape : (T, H, W) or (H, W) latent grid; (13, 40, 64) = 33,280 tokens, 49 × 320 × 512 video
    batch : samples a step (B)
    dtype : parameters, gradients and activations
    prompt_length : padded prompt tokens (URSA: 320)
    checkpointing : activation checkpointing of every decoder layer
    optimizer : ``"adamw"`` (:func:`adamw_step`: fp32 moments resident, the update in the step) or None
        (forward and backward only)
    master_weights : an fp32 master copy of the parameters in the optimizer state (default: when ``dtype``
        is not fp32; ignored without an optimizer)
    loss : ``model -> module`` called as ``module(prompt_ids, x_t, x1)`` returning the loss (default:
        :class:`ursa_engine.training.LatentLoss`); e.g. a dense loss to see the (n, K) check fail
    gpu : make backend choices as on a CUDA device (:func:`ursa_engine.ops_library.as_gpu`); False: as on
        this CPU (a real CPU run of the same step then holds the same bytes)
    count_flops : count FLOPs with ``FlopCounterMode`` (custom ops count 0)
    granularity : allocation rounding (the CUDA caching allocator's 512 bytes; 1: exact)
    name : the model's name in the plan (default: the preset name, or "custom")
    """
    from .. import ops_library
    from ..config import ModelConfig
    from ..model import URSATransformer
    from ..training import LatentLoss

    t0 = time.perf_counter()
    name = name or (config if isinstance(config, str) else "custom")
    cfg = ModelConfig.preset(config) if isinstance(config, str) else config
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if int(batch) < 1:
        raise ValueError(f"batch: expected a positive int, got {batch}")
    shape = tuple(int(s) for s in latents_shape)
    T, H, W = (1, *shape) if len(shape) == 2 else shape
    B, n, K = int(batch), T * H * W, cfg.lm_head_size
    L = prompt_length + 1 + n
    master = bool(optimizer) and (dtype != torch.float32 if master_weights is None else bool(master_weights))
    model = URSATransformer(cfg, dtype=dtype, device="meta")
    model.gradient_checkpointing = bool(checkpointing)
    attn_name, attn_label, attn_expand, attend = planned_attention(model, dtype, B, L, "cuda" if gpu else "cpu")
    mem = _StepBytes(watch=n * K, granularity=granularity, workspace=ops_library.workspace_buffers)
    notes: list[str] = []
    placement = ops_library.as_gpu() if gpu else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True), placement, _values_unchecked():
        with mem, mem.track_modules(model):
            with mem.phase("weights"):
                model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
            module = (loss or LatentLoss)(model)  # LatentLoss sets the parameters trainable
            params = [p for p in model.parameters() if p.requires_grad]
            with mem.phase("optimizer state"):
                states = adamw_state(params, master_weights=master) if optimizer else []
            resident = mem.current
            with mem.phase("inputs"):
                prompt_ids = torch.zeros((B, prompt_length), dtype=torch.long)
                x_t = torch.zeros((B, T, H, W), dtype=torch.long)
                x1 = torch.zeros((B, T, H, W), dtype=torch.long)
            mem.watching = True
            layers = model.model.layers
            with attending(model, attend), mem.phase_of([layer.self_attn for layer in layers], "attention"), \
                    mem.phase_of([layer.mlp for layer in layers], "mlp"), _phase_switch(mem) as switch:
                switch("forward")
                hook = model.model.norm.register_forward_hook(lambda *args: switch("loss"))
                try:
                    value = module(prompt_ids, x_t, x1)
                finally:
                    hook.remove()
                saved = mem.current - mem.phases["forward"].start
                switch("backward")
                value.backward()
                grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
                if optimizer:
                    switch("optimizer")
                    adamw_step(params, states, step=2)
                    for p in params:
                        p.grad = None
                switch(None)
            mem.watching = False
        counter = _count_flops(model, module, (prompt_ids, x_t, x1)) if count_flops else None
    phases = {key: {"peak_bytes": s.peak, "start_bytes": s.start, "end_bytes": s.end, "largest": s.largest,
                    "most_elements": s.most_elements} for key, s in mem.phases.items()}
    largest_param = max(p.numel() for p in model.parameters())
    if largest_param >= n * K:
        notes.append(f"a parameter has {largest_param:,} >= n·K = {n * K:,} elements: its gradient and optimizer "
                     "temporaries are (n, K)-sized too, the check cannot tell them from logits")
    if cfg.num_params() != sum(p.numel() for p in model.parameters()):
        notes.append("ModelConfig.num_params() disagrees with the model's parameters")
    custom = {k: sorted(v) for k, v in mem.custom_ops.items()}
    loss_ops = custom.get("loss") or ["plain torch"]
    loss_name = f"{type(module).__name__} ({', '.join(loss_ops)})"
    if count_flops and any(custom.get(k) for k in ("forward", "loss", "backward")):
        notes.append("FLOPs: the custom ops (" + ", ".join(sorted({op for k in ("forward", "loss", "backward")
                                                                     for op in custom.get(k, ())}))
                     + ") are not counted")
    if optimizer:
        notes.append(f"optimizer: AdamW, fp32 moments{' and fp32 master weights' if master else ''} resident; the "
                     f"update parameter by parameter in chunks of {OPTIMIZER_CHUNK:,} elements; gradients in "
                     f"{str(dtype).replace('torch.', '')}, freed after the update")
    plan = TrainingPlan(
        model=name, config={"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                            "lm_head_size": K, "parameters": sum(p.numel() for p in model.parameters())},
        latents_shape=[T, H, W], batch=B, prompt_length=prompt_length, seq_len=L, latent_tokens=n, codebook_size=K,
        dtype=str(dtype).replace("torch.", ""), checkpointing=bool(checkpointing), optimizer=optimizer,
        master_weights=master, loss=loss_name,
        attention=attn_label, attention_backend=attn_name, kv_expansion_bytes=attn_expand,
        peak_bytes=mem.peak, peak_above_resident_bytes=mem.peak - resident, resident_bytes=resident,
        peak_phase=mem.peak_at["phase"].split("/")[0], peak_at=dict(mem.peak_at), peak_tensors=mem.peak_tensors,
        weight_bytes=sum(_nbytes(p) for p in model.parameters()), gradient_bytes=grads,
        optimizer_state_bytes=sum(_nbytes(t) for st in states for t in st.values()),
        input_bytes=sum(_nbytes(t) for t in (prompt_ids, x_t, x1)), saved_bytes=saved, phases=phases,
        nk_elements=n * K, nk_buffers=list(mem.big), largest_parameter_elements=largest_param, custom_ops=custom,
        flops=counter.get_total_flops() if counter else None,
        flops_by_op={str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        if counter else {},
        forward_flops=cfg.forward_flops(L, batch=B, latent_tokens=n), granularity=granularity, notes=notes)
    plan.seconds = time.perf_counter() - t0
    return plan


def _count_flops(model: nn.Module, module: nn.Module, inputs) -> FlopCounterMode:
    """FLOPs of the forward and backward, counted in a run of their own: FlopCounterMode keeps
    tensors alive across a checkpointed backward, so it never runs beside the byte count."""
    counter = FlopCounterMode(display=False, custom_mapping=_FLOPS)
    with warnings.catch_warnings(), counter:
        warnings.simplefilter("ignore")  # its module tracker and checkpointing warn about each other
        module(*inputs).backward()
    for p in model.parameters():
        p.grad = None
    return counter


@contextlib.contextmanager
def _phase_switch(mem: LiveBytes) -> Iterator[Callable[[str | None], None]]:
    """``switch(name)`` ends the open top-level phase and starts ``name`` (None: none)."""
    open_phase = []

    def switch(name):
        if open_phase:
            open_phase.pop().__exit__(None, None, None)
        if name is not None:
            cm = mem.phase(name)
            cm.__enter__()
            open_phase.append(cm)

    try:
        yield switch
    finally:
        switch(None)
