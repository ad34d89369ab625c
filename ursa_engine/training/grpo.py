"""GRPO on the bundled digits model, end to end on the CPU (issue 18 item 4; docs/design.md §9).

    python -m ursa_engine.training.grpo --out runs/grpo            # full fine-tuning, 5-9 min on 2 CPU cores
    python -m ursa_engine.training.grpo --out runs/grpo-lora --lora-rank 8 --lr 1e-3

Each iteration draws ``P`` prompts (digit labels) and ``G`` rollouts of each (distinct seeds) from
the engine at guidance 1 with the trajectory recorded (``Engine.generate(return_trajectory=True)``),
scores the decoded digits with a reward function (default: :func:`.rewards.digit_probability`, the
probability a classifier of scikit-learn's real digits gives the prompted class), and normalises
the rewards within each prompt's group, ``A = (r − mean_g) / (std_g + eps)``. It then replays a few
early model calls of the trajectory with gradients (``training.trajectory_logprobs``) and minimises
the clipped-ratio objective per latent token (PPO's clip ε)::

    ratio = exp(log p_θ(x̂1 | x_k) − log p_old(x̂1 | x_k))        # the step's own law cancels (§9)
    loss  = mean_tokens[ −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A) + β·k3 ]
    k3    = exp(ℓ_ref − ℓ_θ) − (ℓ_ref − ℓ_θ) − 1                   # KL(θ ‖ ref) estimator on the same x̂1

with AdamW over all weights or over LoRA adapters (:mod:`.lora`).

Steps replayed: by default every model call. UDM-GRPO trains on a few early steps; on this model
(10 steps, 9 calls) replaying only calls 0-2 or 0-4 barely moved the held-out reward in 40
iterations (0.75 -> 0.80 / 0.81) while all 9 calls reached 0.93: the late calls' x̂1 become the
final tokens, so that is where most of the reward's credit is. ``--replay-steps 0,1,2`` selects.

Before and after training it
samples held-out seeds (never used for rollouts) and reports the mean reward with a 95% interval
and the demo classifier's accuracy, at guidance 1 and at the demo's guidance (a reward that rises
while the independent classifier's accuracy falls would be reward hacking).

Outputs in ``--out``: ``checkpoint/`` (a full digits root: ``Engine.from_pretrained`` and
``ursa-engine demo --root`` load it; with LoRA the merged weights, and ``adapter/`` in PEFT's
layout), ``report.json``, ``reward.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import rewards as rewards_mod
from .lora import LoRAAdapter


def _provenance() -> dict:
    """The code a report came from: ``commit`` and ``dirty`` of the checkout holding this package (None outside one)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10, check=False).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


EVAL_SEED = 10**9  # held-out seeds start here; rollout seeds stay below (checked)


@dataclasses.dataclass
class GRPOConfig:
    """Hyper-parameters of :func:`train` (defaults: the committed CPU run)."""

    iterations: int = 120
    prompts: int = 10  # P labels an iteration (every class once when 10)
    group_size: int = 8  # G rollouts a prompt
    num_steps: int = 10  # sampling steps of a rollout (9 model calls: the metric path's step 0 makes none)
    replay_steps: tuple[int, ...] | None = None  # model-call indices trained on; None: every call
    guidance_scale: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    inner_epochs: int = 1
    minibatches: int = 1  # optimizer steps an epoch (sample-wise split of the P·G rollouts)
    adv_eps: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None
    seed: int = 0
    eval_per_class: int = 20
    demo_guidance: float = 3.0  # the demo's defaults, for the no-hacking check
    demo_steps: int = 25
    max_minutes: float | None = 8.0  # start no iteration past this many minutes of the run (10-minute budget)


# ------------------------------------------------------------------ the objective
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(r − mean_g) / (std_g + eps)`` within each group (population std), (P, G) -> (P, G)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards: expected (P, G), got shape {tuple(r.shape)}")
    return (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                      *, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate per token, mean over tokens, plus ``kl_coef`` × k3 KL to a reference.

    Parameters
    ----------
    logp : (B, ...) log p_θ of the drawn x̂1 (with autograd)
    old_logp : (B, ...) the rollout's log-probabilities (no gradient)
    advantages : (B,) one per sample, broadcast over its tokens
    clip_eps : ε of ``clip(ratio, 1 − ε, 1 + ε)``
    ref_logp : (B, ...) the frozen reference's log-probabilities (needed when ``kl_coef`` > 0)
    mask : (B, ...) bool, tokens that count (default all)

    Returns
    -------
    (loss, stats) with stats ``clip_frac``, ``kl`` (mean k3), ``ratio_mean`` as floats
    """
    adv = advantages.reshape(-1, *([1] * (logp.dim() - 1))).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef: a KL penalty needs ref_logp")
    m = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.expand_as(per_token)
    n = m.sum().clamp_min(1)
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps) & m
        stats = {"clip_frac": float(clipped.sum() / n), "kl": float((kl * m).sum() / n),
                 "ratio_mean": float((ratio * m).sum() / n)}
    return loss, stats


# ------------------------------------------------------------------ engine calls (one place)
def rollout(engine, prompt_ids: torch.Tensor, grid: tuple[int, int], cfg: GRPOConfig, seed: int):
    """(final tokens (B, 1, h, w), trajectory) of one batch of images at the rollout guidance."""
    res = engine.generate(prompt_ids, latents_shape=(1, *grid), guidance_scale=cfg.guidance_scale,
                          num_steps=cfg.num_steps, seed=seed, return_trajectory=True, decode=False)
    return res.tokens, res.trajectory


def replay(model, traj, steps: list[int]) -> torch.Tensor:
    """``log p_θ(x̂1 | x_k)`` of the trajectory's calls ``steps``, (B, len(steps), T, h, w) with autograd."""
    from .replay import trajectory_logprobs

    return trajectory_logprobs(model, None, traj, steps=steps, with_step_logprobs=False).x1_logprobs


# ------------------------------------------------------------------ evaluation
def evaluate(dm, labels: np.ndarray, seed: int, *, reward_fn: Callable, guidance_scale: float, num_steps: int,
             batch: int = 200) -> dict:
    """Reward and demo-classifier accuracy of samples of ``labels`` with seeds ``seed + i``."""
    rs, acc = [], []
    for s in range(0, len(labels), batch):
        lab = labels[s : s + batch]
        px = dm.decode(dm.generate(lab, 1, seed=seed + s, num_steps=num_steps, guidance_scale=guidance_scale))
        rs.append(np.asarray(reward_fn(px, lab), np.float64))
        acc.append(rewards_mod.demo_accuracy(px, lab).astype(np.float64))
    r, a = np.concatenate(rs), np.concatenate(acc)
    return {"reward": float(r.mean()), "ci95": ci95(r), "accuracy": float(a.mean()), "accuracy_ci95": ci95(a),
            "n": len(r), "rewards": r}


def ci95(x: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% interval of a mean: 1.96·sd/√n (sd with n − 1)."""
    x = np.asarray(x, np.float64)
    return float(1.96 * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


# ------------------------------------------------------------------ training
def train(dm, cfg: GRPOConfig, *, reward_fn: Callable = rewards_mod.digit_probability, log=print,
          started: float | None = None) -> dict:
    """Run GRPO on ``dm.engine.model`` in place; returns the curve and the LoRA adapter (unmerged) or None.

    ``started``: the ``time.perf_counter()`` that ``cfg.max_minutes`` counts from (default: now).
    """
    model = dm.engine.model
    adapter = None
    if cfg.lora_rank:
        model.requires_grad_(False)
        adapter = LoRAAdapter(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        params = list(adapter.parameters())
    else:
        model.requires_grad_(True)
        params = list(model.parameters())
    ref = None
    if cfg.kl_coef and adapter is None:
        ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    P, G = cfg.prompts, cfg.group_size
    if (cfg.seed + 1) * cfg.iterations * P * G >= EVAL_SEED:
        raise ValueError("seed / iterations: rollout seeds would reach the held-out evaluation seeds")
    curve, t0 = [], time.perf_counter()
    started = t0 if started is None else started
    for it in range(cfg.iterations):
        if cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes:
            log(f"stopping after {it} iterations: --max-minutes {cfg.max_minutes} reached")
            break
        labels = np.repeat(np.resize(rng.permutation(10), P), G)  # (P·G,) grouped by prompt
        seed = (cfg.seed * cfg.iterations + it) * P * G  # sample b: seed + b, distinct across iterations
        with torch.no_grad():
            tokens, traj = rollout(dm.engine, dm.prompts(labels), dm.grid, cfg, seed)
        r = torch.as_tensor(np.asarray(reward_fn(dm.decode(tokens), labels), np.float32))
        adv = group_advantages(r.view(P, G), cfg.adv_eps).reshape(-1)
        steps = list(range(traj.num_calls)) if cfg.replay_steps is None else list(cfg.replay_steps)
        old = traj.x1_logprobs[:, steps]
        mask = None if traj.frozen is None else ~traj.frozen[:, None]
        ref_lp = None
        if cfg.kl_coef:
            with torch.no_grad():
                if adapter is not None:
                    with adapter.disabled():
                        ref_lp = replay(model, traj, steps)
                else:
                    ref_lp = replay(ref, traj, steps)
        stats = []
        for _ in range(cfg.inner_epochs):
            for idx in torch.randperm(P * G, generator=torch.Generator().manual_seed(it)).chunk(cfg.minibatches):
                sub = _select(traj, idx)
                loss, st = clipped_objective(replay(model, sub, steps), old[idx], adv[idx], cfg.clip_eps,
                                             ref_logp=None if ref_lp is None else ref_lp[idx],
                                             kl_coef=cfg.kl_coef, mask=None if mask is None else mask[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
                stats.append({"loss": float(loss.detach()), **st})
        row = {"iteration": it, "reward": float(r.mean()), "reward_std": float(r.std()),
               "seconds": round(time.perf_counter() - t0, 2)}
        row.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
        curve.append(row)
        log(f"it {it:3d}  reward {row['reward']:.3f}  loss {row['loss']:+.4f}  clip {row['clip_frac']:.3f}  "
            f"kl {row['kl']:.4f}  |g| {row['grad_norm']:.3f}  {row['seconds']:.0f}s")
    model.requires_grad_(False)
    return {"curve": curve, "adapter": adapter, "train_seconds": time.perf_counter() - t0}


def _select(traj, idx: torch.Tensor):
    """The trajectory of samples ``idx`` (every per-sample field indexed, the rest shared)."""
    fields = {}
    for f in dataclasses.fields(traj):
        v = getattr(traj, f.name)
        per_sample = isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == traj.seeds.shape[0] \
            and f.name not in ("steps", "times", "guided")
        fields[f.name] = v[idx] if per_sample else v
    return dataclasses.replace(traj, **fields)


# ------------------------------------------------------------------ the whole run
def save_checkpoint(dm, base_root: Path, out: Path) -> None:
    """A full digits root at ``out``: the base root's other folders copied, the transformer rewritten.

    Written whole into a temporary sibling folder first and then moved into place, so a failed or
    interrupted save leaves the previous ``out`` (or none), never a half-written root.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
    old = None
    try:
        shutil.copytree(base_root, tmp, ignore=shutil.ignore_patterns("transformer"), dirs_exist_ok=True)
        dm.engine.model.save_pretrained(tmp / "transformer")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as JSON at ``path``, atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def run(out: str | Path, cfg: GRPOConfig | None = None, *, root=None, reward_fn: Callable | None = None,
        threads: int | None = None, log=print) -> dict:
    """Evaluate, train, save, evaluate the saved checkpoint; write ``report.json`` and ``reward.png``.

    ``threads``: torch's CPU threads during the run (restored after). Returns the report.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out), cfg or GRPOConfig(), root=root, reward_fn=reward_fn or rewards_mod.digit_probability,
                    log=log)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, cfg: GRPOConfig, *, root, reward_fn: Callable, log) -> dict:
    from ..demo import DEFAULT_ROOT, DigitsModel

    root = Path(root) if root is not None else DEFAULT_ROOT
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    labels = np.repeat(np.arange(10), cfg.eval_per_class)

    def evaluate_all(dm):
        g1 = evaluate(dm, labels, EVAL_SEED, reward_fn=reward_fn, guidance_scale=cfg.guidance_scale,
                      num_steps=cfg.num_steps)
        demo = evaluate(dm, labels, EVAL_SEED, reward_fn=reward_fn, guidance_scale=cfg.demo_guidance,
                        num_steps=cfg.demo_steps)
        return g1, demo

    dm = DigitsModel.load(root)
    before, before_demo = evaluate_all(dm)
    log(f"before: reward {before['reward']:.3f} ± {before['ci95']:.3f}, accuracy {before['accuracy']:.3f} "
        f"(guidance {cfg.guidance_scale}); accuracy {before_demo['accuracy']:.3f} (guidance {cfg.demo_guidance})")
    result = train(dm, cfg, reward_fn=reward_fn, log=log, started=t0)
    if result["adapter"] is not None:
        result["adapter"].save_pretrained(out / "adapter")
        result["adapter"].merge()
    save_checkpoint(dm, root, out / "checkpoint")
    after, after_demo = evaluate_all(DigitsModel.load(out / "checkpoint"))  # the saved weights
    diff = after["rewards"] - before["rewards"]  # same seeds and labels: a paired difference
    report = {
        "reward_before": before["reward"], "reward_after": after["reward"],
        "ci95_before": before["ci95"], "ci95_after": after["ci95"],
        "reward_delta": float(diff.mean()), "ci95_delta_paired": ci95(diff),
        "ci_method": "normal approximation, mean ± 1.96·sd/√n (sd with n − 1); the delta's interval pairs "
                     "each held-out (label, seed) before and after",
        "n_eval": before["n"], "eval_seeds": [EVAL_SEED, EVAL_SEED + before["n"] - 1],
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "demo_accuracy_before": before_demo["accuracy"], "demo_accuracy_after": after_demo["accuracy"],
        "demo_reward_before": before_demo["reward"], "demo_reward_after": after_demo["reward"],
        "accuracy_note": f"accuracy: the demo's classifier (RBF SVM, argmax == prompted class) on the same samples "
                         f"at guidance {cfg.guidance_scale} / {cfg.num_steps} steps; demo_*: at the demo's "
                         f"guidance {cfg.demo_guidance} / {cfg.demo_steps} steps",
        "reward_fn": getattr(reward_fn, "__qualname__", repr(reward_fn)),
        "minutes": (time.perf_counter() - t0) / 60, "train_minutes": result["train_seconds"] / 60,
        "iterations_run": len(result["curve"]), "torch_threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg), **_provenance(), "curve": result["curve"],
    }
    write_json(out / "report.json", report)
    plot_curve(report, out / "reward.png")
    log(f"after: reward {after['reward']:.3f} ± {after['ci95']:.3f} (before {before['reward']:.3f} ± "
        f"{before['ci95']:.3f}), accuracy {after['accuracy']:.3f} / demo {after_demo['accuracy']:.3f}; "
        f"{report['minutes']:.1f} min; wrote {out}")
    return report


def plot_curve(report: dict, path: Path) -> bool:
    """The per-iteration rollout reward and the held-out before / after intervals (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    it = [c["iteration"] for c in report["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(it, [c["reward"] for c in report["curve"]], lw=1.2, label="rollout reward (training seeds)")
    for key, colour in (("before", "tab:grey"), ("after", "tab:green")):
        m, h = report[f"reward_{key}"], report[f"ci95_{key}"]
        ax.axhline(m, color=colour, ls="--", lw=1, label=f"held-out {key}: {m:.3f} ± {h:.3f}")
        ax.axhspan(m - h, m + h, color=colour, alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("p(prompted class)")
    ax.set_title("GRPO on the digits model (guidance 1)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)  # atomic: a temporary file in the same folder, then os.replace
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


def main(argv=None) -> int:
    d = GRPOConfig()
    ap = argparse.ArgumentParser(prog="python -m ursa_engine.training.grpo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--root", default=None, help="digits checkpoint root (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny; on busy cores 2 threads ran ~10x slower)")
    for f in dataclasses.fields(GRPOConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(d, f.name)
        if f.name == "replay_steps":
            ap.add_argument(flag, default="all", help="model-call indices replayed, e.g. 0,1,2 (default: all)")
        elif isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = float if f.name in ("lora_alpha", "max_minutes") else type(default)
            ap.add_argument(flag, type=kind, default=default, help=f"default {default}")
    args = ap.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig)}
    if values["replay_steps"] == "all":
        values["replay_steps"] = None
    else:
        values["replay_steps"] = tuple(int(s) for s in values["replay_steps"].split(",") if s.strip())
    run(args.out, GRPOConfig(**values), root=args.root, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
