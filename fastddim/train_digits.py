"""Train the embedded default model: a small DDPM UNet on scikit-learn's 8x8 digits.

Run as::

    python -m fastddim.train_digits [--out DIR] [--epochs N] [--device cpu|cuda] [--seed S]

The data is ``sklearn.datasets.load_digits()`` (1797 images, 8x8, integer values 0..16,
bundled with scikit-learn so nothing is downloaded), scaled to [-1, 1] with one channel.
Training is standard DDPM epsilon prediction (``DDPMScheduler.add_noise`` + MSE) over 1000
timesteps with the ``squaredcos_cap_v2`` schedule, AdamW with a warmup + cosine learning
rate, and an EMA of the weights, which is what gets saved.

The result is written as a diffusers pipeline folder (``model_index.json``, ``unet/``,
``scheduler/``) whose scheduler is a ``DDIMScheduler`` with the training beta schedule, so
``diffusers.DDIMPipeline.from_pretrained(out)`` samples from it directly.

On CPU the run is seeded and deterministic: every random draw (batch order, timesteps,
noise) comes from one CPU ``torch.Generator`` and deterministic algorithms are enforced.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from fastddim.models import DEFAULT_MODEL_DIR

__all__ = [
    "BETA_SCHEDULE",
    "NUM_TRAIN_TIMESTEPS",
    "build_unet",
    "build_scheduler",
    "load_digits_tensor",
    "train",
    "save_model",
    "sample_grid",
    "main",
]

NUM_TRAIN_TIMESTEPS = 1000
# Cosine rather than linear: at 8x8 the linear schedule wipes out the signal within the first
# few hundred steps, wasting most timesteps on near-pure noise.
BETA_SCHEDULE = "squaredcos_cap_v2"
RESOLUTION = 8
# Largest pixel value in sklearn's digits (4x4 blocks of the 32x32 bitmaps, so counts 0..16).
DIGITS_MAX = 16.0


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's digits as a float tensor in [-1, 1].

    Returns:
        ``(images, labels)``: images of shape ``(1797, 1, 8, 8)`` float32 in [-1, 1]
        (0 -> -1, 16 -> 1) and integer labels of shape ``(1797,)``.
    """
    # Imported here so that importing this module (e.g. for build_unet) does not need sklearn.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1)
    images = images / (DIGITS_MAX / 2.0) - 1.0
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return images, labels


def build_unet() -> UNet2DModel:
    """Build the (untrained) UNet used for the digits model.

    Two resolution levels (8x8 and 4x4) with self-attention at 4x4: enough for 8x8 digits
    while keeping the fp32 safetensors under 2 MB and CPU sampling fast.

    Returns:
        A freshly initialised ``UNet2DModel`` for 1-channel 8x8 images.
    """
    return UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 48),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=8,
    )


def build_scheduler() -> DDIMScheduler:
    """Build the DDIM scheduler that is shipped with the model.

    Returns:
        A ``DDIMScheduler`` with the training beta schedule, epsilon prediction and
        ``clip_sample=True`` (the data lives in [-1, 1]).
    """
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=True,
    )


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move each EMA parameter towards the live one: ``ema = decay * ema + (1 - decay) * p``."""
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)


def train(
    epochs: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.998,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 10,
) -> tuple[UNet2DModel, list[float]]:
    """Train the digits UNet and return its EMA weights.

    Args:
        epochs: Passes over the 1797 digits.
        batch_size: Images per optimiser step (the last, short batch of an epoch is dropped).
        lr: Peak AdamW learning rate.
        ema_decay: Final EMA decay; it warms up from 0 so early steps are not frozen in.
        seed: Seed of the single CPU generator behind all random draws and of model init.
        device: ``"cpu"`` or ``"cuda"``.
        log_every: Print a progress line every this many epochs.

    Returns:
        ``(ema_unet, epoch_losses)``: the EMA model in eval mode on the CPU and the mean
        training loss of each epoch.

    Raises:
        ValueError: If an argument is out of range or the device is unavailable.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")

    if dev.type == "cpu":
        # CPU runs must be reproducible bit for bit; on CUDA this would need CUBLAS env setup
        # and slower kernels, and GPU runs are only used for timing.
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    images, _ = load_digits_tensor()
    images = images.to(dev)
    n = images.shape[0]
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n})")
    total_steps = epochs * steps_per_epoch

    model = build_unet().to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)
    # add_noise moves alphas_cumprod to the sample's device on every call; doing it once is cheaper.
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(200, total_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training digits UNet: {n_params} params, {n} images, {epochs} epochs x {steps_per_epoch} steps, "
        f"batch {batch_size}, device {dev}, seed {seed}, torch threads {torch.get_num_threads()}",
        flush=True,
    )

    epoch_losses: list[float] = []
    step = 0
    t_start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        # All randomness is drawn on the CPU generator, so the stream is identical on every device.
        perm = torch.randperm(n, generator=gen)
        noise_all = torch.randn((steps_per_epoch * batch_size, *images.shape[1:]), generator=gen)
        t_all = torch.randint(0, NUM_TRAIN_TIMESTEPS, (steps_per_epoch * batch_size,), generator=gen)
        perm, noise_all, t_all = perm.to(dev), noise_all.to(dev), t_all.to(dev)
        loss_sum = torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            clean = images[perm[sl]]
            noise = noise_all[sl]
            timesteps = t_all[sl]
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            pred = model(noisy, timesteps).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            _ema_update(ema, model, min(ema_decay, (1.0 + step) / (10.0 + step)))
            loss_sum += loss.detach()
            step += 1
        # One host sync per epoch keeps the GPU queue full.
        epoch_losses.append(float(loss_sum) / steps_per_epoch)
        if (epoch + 1) % log_every == 0 or epoch == 0 or epoch + 1 == epochs:
            elapsed = time.perf_counter() - t_start
            print(
                f"epoch {epoch + 1:4d}/{epochs}  loss {epoch_losses[-1]:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  elapsed {elapsed:6.1f}s",
                flush=True,
            )
    return ema.to("cpu"), epoch_losses


def save_model(unet: UNet2DModel, out: pathlib.Path, meta: dict[str, object] | None = None) -> None:
    """Save the UNet and its DDIM scheduler as a diffusers pipeline folder.

    Args:
        unet: The trained model (its weights are saved in its current dtype, fp32 here).
        out: Target folder; created if needed, existing files in it are overwritten.
        meta: Optional training settings, written to ``out/training_args.json`` so the
            shipped weights say how they were made.
    """
    out.mkdir(parents=True, exist_ok=True)
    pipe = DDIMPipeline(unet=unet, scheduler=build_scheduler())
    pipe.save_pretrained(out, safe_serialization=True)
    if meta is not None:
        (out / "training_args.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # safetensors writes through a 0600 temp file; a wheel built from it would install weights
    # that only the installing user can read.
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


@torch.no_grad()
def sample_grid(unet: UNet2DModel, path: pathlib.Path, num: int = 64, steps: int = 50, seed: int = 0) -> None:
    """Sample digits with a DDIM loop and save them as an upscaled PNG grid (for eyeballing).

    Args:
        unet: The model to sample from.
        path: PNG file to write.
        num: Number of samples; laid out 8 per row.
        steps: DDIM steps (eta 0).
        seed: Seed of the initial noise.
    """
    from PIL import Image

    scheduler = build_scheduler()
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num, 1, RESOLUTION, RESOLUTION), generator=gen)
    unet = unet.eval()
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    cols = 8
    rows = math.ceil(num / cols)
    pad = 1
    cell = RESOLUTION + pad
    grid = np.full((rows * cell + pad, cols * cell + pad), 64, dtype=np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[pad + r * cell : pad + r * cell + RESOLUTION, pad + c * cell : pad + c * cell + RESOLUTION] = img
    scale = 8
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, save the pipeline folder, optionally save a preview.

    Args:
        argv: Arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        Process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m fastddim.train_digits",
        description="Train fastddim's embedded digits model (DDPM UNet on sklearn's 8x8 digits).",
    )
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_MODEL_DIR, help="output pipeline folder")
    parser.add_argument("--epochs", type=int, default=300, help="passes over the 1797 digits (default 300)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, batch order, noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    parser.add_argument("--ema-decay", type=float, default=0.998, help="EMA decay of saved weights (default 0.998)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--preview", type=pathlib.Path, default=None, help="also save a PNG grid of 64 samples")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        unet, losses = train(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as exc:
        parser.error(str(exc))
    train_s = time.perf_counter() - t0
    meta = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "device": args.device,
        "beta_schedule": BETA_SCHEDULE,
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "final_epoch_loss": round(losses[-1], 5),
        "torch_version": torch.__version__,
    }
    save_model(unet, args.out, meta)
    print(f"saved pipeline to {args.out}", flush=True)
    if args.preview is not None:
        sample_grid(unet, args.preview)
        print(f"saved preview grid to {args.preview}", flush=True)
    print(f"total training wall time: {train_s:.1f}s ({time.perf_counter() - t0:.1f}s including save)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
