"""Train the embedded default model on scikit-learn's digits (CPU, public API only).

    python scripts/train_digits.py --out ursa_engine/assets/digits --minutes 30

(run from the repository root, e.g. with ``PYTHONPATH=.`` when the package is not installed).
The bundled model: ``--minutes 55 --steps 5000`` on 2 cores shared with 3-4 other jobs, which
gave 4,219 steps (~0.78 s a step; ~0.28 s on 2 idle cores, so 30 minutes there make ~6,000).

What it builds (docs/design.md §3 checkpoint layout, read back by ``ue.Engine.from_pretrained``)::

    OUT/transformer/   config.json + diffusion_pytorch_model.safetensors (EMA weights, fp32)
    OUT/scheduler/     scheduler_config.json (alpha, c, shift) + scheduler_model.safetensors ("path.emb")
    OUT/vae/           the 2×2 patch tokenizer: config.json + patch_tokenizer.safetensors (pixel decoder)
    OUT/digits.json    prompt and canvas conventions of the demo

Model: the ``tiny`` preset widened to hidden 128 / 4 layers (the 64-wide, 2-layer preset learns the
digits too slowly for a 30-minute CPU budget) with K = 256 codes. Prompt: the class label as two
text ids ("digit 3"), prompt length 2; 10% label dropout trains the unconditional (empty prompt)
branch for CFG. Times: one shifted time per latent frame (asynchronous), with a share of
synchronous clips so the all-frames-equally-noisy state of sampling is seen often too.
Every step trains one batch of still images (T = 1) and one of 4-frame moving-digit videos.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import ursa_engine as ue
from ursa_engine import digits, training

ALPHA, C, SHIFT = 1.0, 3.0, 1.0
MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "num_hidden_layers": 4}


def build_config(K: int) -> ue.ModelConfig:
    base = ue.ModelConfig.preset("tiny")
    return ue.ModelConfig.preset("tiny", lm_head_size=K, vocab_size=base.lm_vocab_size + K, **MODEL)


def save(out: Path, model, tokenizer: digits.PatchTokenizer, K: int) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(out / "transformer")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(out / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "KineticOptimalScheduler", "alpha": ALPHA, "c": C, "shift": SHIFT,
                   "codebook_size": K}, f, indent=2)
    save_file({"path.emb": tokenizer.embeddings()}, out / "scheduler" / "scheduler_model.safetensors")
    tokenizer.save(out / "vae")
    with open(out / "digits.json", "w") as f:
        json.dump({"prompt_length": digits.PROMPT_LENGTH, "digit_word_id": digits.DIGIT_WORD,
                   "class_base_id": digits.CLASS_BASE, "canvas": list(digits.CANVAS),
                   "video_frames": digits.VIDEO_FRAMES, "latent_grid": [digits.CANVAS[0] // tokenizer.patch,
                                                                         digits.CANVAS[1] // tokenizer.patch]},
                  f, indent=2)


def token_clips(table: torch.Tensor, idx: np.ndarray, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """Moving-digit clips as tokens (B, frames, h, w), read from the per-column token table."""
    out = []
    for i in idx:
        x0, v = digits.data.random_motion(frames, rng)
        out.append(table[i, [x0 + v * f for f in range(frames)]])
    return torch.stack(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ursa_engine/assets/digits"))
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget")
    ap.add_argument("--steps", type=int, default=6000, help="steps (or fewer, when --minutes runs out)")
    ap.add_argument("--image-batch", type=int, default=64)
    ap.add_argument("--video-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--sync-fraction", type=float, default=0.3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust when the cores are shared; OpenMP spin-waits otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    images, labels = digits.load_digits_array()
    tok = digits.PatchTokenizer.fit(digits.make_clips(np.concatenate([images] * 4), 1, rng), K=256,
                                    seed=args.seed)
    K = tok.size
    table = tok.encode(np.stack([[digits.data.place(img, x0) for x0 in range(digits.CANVAS[1] - 7)]
                                 for img in images]))  # (N, positions, 4, 8): every digit at every column
    path = ue.MetricPath(ue.Codebook(tok.embeddings()), alpha=ALPHA, c=C)
    model = ue.URSATransformer(build_config(K))
    pad = model.config.pad_token_id
    net = training.LatentLoss(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    print(f"params {model.config.num_params():,}, K={K}, metric path alpha={ALPHA} c={C} shift={SHIFT}", flush=True)

    budget = args.minutes * 60
    warmup = 200
    start, step, avg = time.time(), 0, None
    while step < args.steps:
        frac = min(max((time.time() - start) / budget, step / args.steps), 1.0)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = 0.0
        for b, frames in ((args.image_batch, 1), (args.video_batch, digits.VIDEO_FRAMES)):
            idx = rng.integers(0, len(images), b)
            x1 = token_clips(table, idx, frames, rng)  # (B, T, 4, 8)
            lab = torch.as_tensor(labels[idx])
            lab = torch.where(torch.as_tensor(rng.random(b) < args.label_dropout), -1, lab)
            seeds = torch.as_tensor(rng.integers(0, 2**62, b), dtype=torch.int64)
            t = training.sample_frame_times(b, frames, shift=SHIFT, seed=seeds)
            sync = torch.as_tensor(rng.random(b) < args.sync_fraction)
            t = torch.where(sync[:, None], t[:, :1], t)
            x_t = training.add_noise(path, x1, t, seed=seeds)
            loss = loss + net(digits.prompt_ids(lab, pad), x_t, x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0 or step in (1, 5, 10, 20):
            print(f"step {step} loss {avg:.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        done = frac >= 1.0 or step >= args.steps
        if step % args.save_every == 0 or done:
            save(args.out, ema, tok, K)
        if done:
            break
    print(f"done: {step} steps in {time.time() - start:.0f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
