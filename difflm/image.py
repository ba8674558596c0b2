"""Image mode: the same Gaussian VDM core on pixels, with a compact U-Net and bits per dimension.

Pixels (integers 0..255) are scaled to [-1, 1]. The ELBO is the core's (`GaussianDiffusion.elbo`) with a
discretized decoder at the first latent: p(x | x_1) puts on each pixel value the mass of N(x0_hat(x_1),
1/SNR(t_1)) over its bin of width 2/255 (the outer bins run to +-infinity), so -ELBO is an upper bound on
-log P(x) of the integer image and bits/dim = -ELBO / (D ln 2) with D = C H W. An untrained model is near
8 bits/dim (a uniform guess over 256 values).

Training uses the simple loss in the configured parameterization (eps, x0 or v). With the learned schedule
(Kingma et al. 2021) it trains the ELBO itself, in bits/dim, so that the schedule's parameters get gradients.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .card import warn_if_unfinished
from .config import Config, DataConfig, positive_ints
from .diffusion import ELBOTerms, GaussianDiffusion, _bcast, _sum_except_batch
from .errors import DifflmError, check_choice, loading
from .modeling import TimeEmbedding, model_type, register_auto_classes
from .runtime import Setup
from .schedules import get_schedule

log = logging.getLogger("difflm")
LN2 = math.log(2.0)
BUILTIN_IMAGES = ("shapes",)
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


# ---- data --------------------------------------------------------------------------------------------------------
def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255 (rounded to the nearest bin centre, clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def builtin_shapes(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """`n` grayscale images (n, 1, size, size) of one filled disc, square or ring each, anti-aliased, with random
    position, size and brightness on a dark background: an offline corpus generated here."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5, torch.arange(size, dtype=torch.float32)
                            + 0.5, indexing="ij")
    kind = torch.randint(0, 3, (n,), generator=g)
    centre = size * (0.3 + 0.4 * torch.rand(n, 2, generator=g))
    radius = size * (0.15 + 0.15 * torch.rand(n, generator=g))
    level = 150 + 105 * torch.rand(n, generator=g)
    dy, dx = yy[None] - centre[:, 0, None, None], xx[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    disc = (dy ** 2 + dx ** 2).sqrt() - r  # signed distances: negative inside
    square = torch.maximum(dy.abs(), dx.abs()) - r
    ring = (disc + 0.5 * r).abs() - 0.25 * r
    dist = torch.where(kind[:, None, None] == 0, disc, torch.where(kind[:, None, None] == 1, square, ring))
    img = (0.5 - dist).clamp(0, 1) * level[:, None, None]  # one pixel of anti-aliasing
    return img.round().to(torch.uint8)[:, None]


def read_idx(path: Path) -> torch.Tensor:
    """An IDX image file (MNIST's format, optionally gzipped) as uint8 (N, 1, H, W)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic, n, h, w = struct.unpack(">IIII", f.read(16))
            if magic != 2051:
                raise DifflmError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
            data = f.read(n * h * w)
    except (OSError, EOFError, struct.error) as e:
        raise DifflmError(f"could not read IDX file {path}: {e}") from None
    if len(data) != n * h * w:
        raise DifflmError(f"IDX file {path} is truncated: {len(data)} of {n * h * w} pixel bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(n, 1, h, w)


def _idx_split(folder: Path, split: str) -> torch.Tensor:
    stem = IDX_FILES.get("test" if split in ("test", "validation", "dev") else "train")
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return read_idx(folder / name)
    raise DifflmError(f"{folder} has no {stem}[.gz] for split {split!r} (MNIST's IDX files)")


def _stack(images: List, source: str) -> torch.Tensor:
    """PIL images or arrays -> uint8 (N, C, H, W); every image must have the same size and channels."""
    import numpy as np

    arrays = [np.asarray(im, dtype=np.uint8) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DifflmError(f"images of {source} have mixed sizes ({', '.join(str(s) for s in sorted(shapes)[:3])}); "
                          f"resize them to one size first")
    out = torch.from_numpy(np.stack(arrays))
    return out[:, None] if out.dim() == 3 else out.permute(0, 3, 1, 2).contiguous()


def _hub_split(cfg: DataConfig, split: str) -> torch.Tensor:
    from .data import _load_dataset

    ds = _load_dataset(cfg.source, split)
    if cfg.image_column not in ds.column_names:
        raise DifflmError(f"image column {cfg.image_column!r} not in {cfg.source}; its columns are "
                          f"{', '.join(ds.column_names)}: set data.image_column (image for MNIST, img for CIFAR-10)")
    return _stack(ds[cfg.image_column], cfg.source)


@dataclass
class ImageSplits:
    train: torch.Tensor  # uint8 (N, C, H, W)
    dev: torch.Tensor


def load_images(cfg: DataConfig) -> ImageSplits:
    """Training and held-out images: builtin:shapes, a folder of MNIST IDX files, or a Hub dataset id; checked
    against data.image_channels and data.image_size."""
    if cfg.source.startswith("builtin:"):
        name = cfg.source.split(":", 1)[1]
        check_choice("builtin image set", name, BUILTIN_IMAGES)
        splits = ImageSplits(builtin_shapes(cfg.builtin_train, cfg.builtin_seed, cfg.image_size),
                             builtin_shapes(cfg.builtin_dev, cfg.builtin_seed + 1, cfg.image_size))
    elif Path(cfg.source).expanduser().is_dir() and any(Path(cfg.source).expanduser().glob("*idx3-ubyte*")):
        folder = Path(cfg.source).expanduser()
        splits = ImageSplits(_idx_split(folder, cfg.train_split), _idx_split(folder, cfg.dev_split))
    else:
        splits = ImageSplits(_hub_split(cfg, cfg.train_split), _hub_split(cfg, cfg.dev_split))
    for name, x in (("training", splits.train), ("held-out", splits.dev)):
        if len(x) == 0:
            raise DifflmError(f"the {name} images of {cfg.source} are empty")
        if x.shape[1] != cfg.image_channels:
            raise DifflmError(f"the {name} images of {cfg.source} have {x.shape[1]} channel(s) but "
                              f"data.image_channels={cfg.image_channels}; set it to {x.shape[1]}")
        if tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise DifflmError(f"the {name} images of {cfg.source} are {x.shape[2]}x{x.shape[3]} but "
                              f"data.image_size={cfg.image_size}; set it to match (square images)")
    if cfg.max_train_examples:
        splits.train = splits.train[: cfg.max_train_examples]
    return splits


# ---- the U-Net ---------------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.drop, self.conv2 = _norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(temb))[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class SelfAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv, self.out = _norm(channels), nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels,
                                                                                                       channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, HW, C) each
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(b, c, h, w))


class ImageDiffusionConfig(PretrainedConfig):
    model_type = "difflm-image"

    def __init__(self, image_size: int = 28, channels: int = 1, base_channels: int = 32,
                 channel_mults: Optional[list] = None, res_blocks: int = 1, attention: bool = True,
                 dropout: float = 0.1, schedule: str = "cosine", num_steps: int = 1000, prediction: str = "v",
                 **kwargs):
        self.image_size, self.channels, self.base_channels = image_size, channels, base_channels
        self.channel_mults = list(channel_mults or [1, 2, 2])
        self.res_blocks, self.attention, self.dropout = res_blocks, attention, dropout
        self.schedule, self.num_steps, self.prediction = schedule, num_steps, prediction
        super().__init__(**kwargs)


class ImageDiffusionModel(PreTrainedModel):
    """A compact U-Net (DDPM's layout: residual blocks with the time embedding, self-attention at the lowest
    resolution) and its GaussianDiffusion."""

    config_class = ImageDiffusionConfig
    base_model_prefix = "difflm_image"

    def __init__(self, config: ImageDiffusionConfig):
        super().__init__(config)
        c0, t_dim, drop = config.base_channels, 4 * config.base_channels, config.dropout
        self.time_embed = TimeEmbedding(t_dim)
        self.inp = nn.Conv2d(config.channels, c0, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [c0], c0
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.res_blocks):
                self.down.append(ResBlock(c, c0 * mult, t_dim, drop))
                c = c0 * mult
                skips.append(c)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, drop),
                                  SelfAttention(c) if config.attention else nn.Identity(),
                                  ResBlock(c, c, t_dim, drop)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), c0 * mult, t_dim, drop))
                c = c0 * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, config.channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.diffusion = GaussianDiffusion(get_schedule(config.schedule), config.num_steps, config.prediction)
        self.post_init()

    def lr_groups(self) -> dict:
        """The parameters that train.schedule_lr addresses (engines.param_groups)."""
        return {"schedule": list(self.diffusion.schedule.parameters())}

    def _init_weights(self, module):
        pass  # PyTorch's default initialisation, with the zero-initialised output layers set above

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output (eps / x0 / score / v per config.prediction) for x_t (B, C, H, W) at t (B,); the
        network runs in its weights' dtype, the output has the dtype of x_t."""
        temb = self.time_embed.embed(t)
        h, hs = self.inp(x_t.to(temb.dtype)), []
        hs.append(h)
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                skip = hs.pop()
                if skip.shape[-2:] != h.shape[-2:]:  # odd sizes (7 -> 14 is fine; 7 -> 4 -> 8 is not)
                    h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
                h = layer(torch.cat([h, skip], dim=1), temb)
            else:
                h = layer(h)
        return self.out(h).to(x_t.dtype)


register_auto_classes(ImageDiffusionConfig, ImageDiffusionModel)


# ---- likelihood --------------------------------------------------------------------------------------------------
def _log_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(z)


def discretized_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(pixel bin of x) under N(mean, std^2), bins of width 2/255 centred on the values of x in [-1, 1]; the
    first and last bins extend to -inf and +inf, so the probabilities of the 256 values sum to one."""
    half = 1.0 / 255.0
    upper, lower = (x + half - mean) / std, (x - half - mean) / std
    log_cdf_upper = _log_normal_cdf(upper)
    log_sf_lower = _log_normal_cdf(-lower)
    # log(Phi(upper) - Phi(lower)), computed stably from whichever tail is smaller
    mid = torch.where(lower > 0, log_sf_lower + torch.log1p(-torch.exp(_log_normal_cdf(-upper) - log_sf_lower)),
                      log_cdf_upper + torch.log1p(-torch.exp(_log_normal_cdf(lower) - log_cdf_upper)))
    return torch.where(x < -1 + half, log_cdf_upper, torch.where(x > 1 - half, log_sf_lower, mid))


def discretized_reconstruction(diffusion: GaussianDiffusion):
    """The modality's -log p(x | x_1) for `GaussianDiffusion.elbo`: the discretized decoder with the core's
    standard deviation 1/sqrt(SNR(t_1)) (the same as `gaussian_reconstruction`'s continuous decoder)."""

    def reconstruction(model_fn, x0, noise):
        t = diffusion.first_t(x0.shape[0], x0.device, x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        x0_hat = diffusion.predict_x0(model_fn(x_t, t), x_t, t)
        std = _bcast(diffusion.snr(t).rsqrt(), x0)
        return -_sum_except_batch(discretized_log_prob(x0, x0_hat, std))

    return reconstruction


def image_elbo(model: ImageDiffusionModel, pixels: torch.Tensor, generator=None, t=None,
               stratum: Optional[tuple] = None) -> ELBOTerms:
    """-ELBO terms per image (nats) for uint8 pixels, one draw of the diffusion term's time."""
    d = model.diffusion
    x0 = to_model_space(pixels)
    if t is None:
        t = d.sample_t(len(x0), x0.device, generator=generator, low_step=2, dtype=x0.dtype, stratum=stratum)
    return d.elbo(model, x0, reconstruction=discretized_reconstruction(d), t=t, generator=generator)


def dims(model: ImageDiffusionModel) -> int:
    c = model.config
    return c.channels * c.image_size * c.image_size


class ImageLoss(NamedTuple):
    """The image objective's loss (a named tuple, like text.TextLoss, for ZeRO-3's output hooks)."""

    loss: torch.Tensor

    def parts(self) -> Dict[str, torch.Tensor]:
        return {}


class ImageObjective(nn.Module):
    """The training loss as a module (an engine wraps it): the simple loss, or with a learned schedule the ELBO
    in bits/dim."""

    def __init__(self, model: ImageDiffusionModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> ImageLoss:
        model = self.model
        d = model.diffusion
        if d.schedule.learnable:
            return ImageLoss((image_elbo(model, pixels, generator).total / (dims(model) * LN2)).mean())
        x0 = to_model_space(pixels)
        t = d.sample_t(len(x0), x0.device, generator=generator, dtype=x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return ImageLoss(d.denoise(model, x0, t, noise).loss.mean())

    def external_parameters(self):
        return []


# ---- training set-up, sampling, evaluation -----------------------------------------------------------------------
def image_model_config(cfg: Config) -> ImageDiffusionConfig:
    u = cfg.unet
    mults = positive_ints(u.channel_mults)
    if mults is None:
        raise DifflmError(f"unet.channel_mults must be positive integers separated by commas, got {u.channel_mults!r}")
    return ImageDiffusionConfig(image_size=cfg.data.image_size, channels=cfg.data.image_channels,
                                base_channels=u.base_channels, channel_mults=mults, res_blocks=u.res_blocks,
                                attention=u.attention, dropout=u.dropout, schedule=cfg.diffusion.schedule,
                                num_steps=cfg.diffusion.num_steps, prediction=cfg.diffusion.prediction)


def image_setup(cfg: Config):
    """The training loop's Setup for image mode (train.train dispatches on data.modality)."""
    mcfg = image_model_config(cfg)
    splits = load_images(cfg.data)
    model = ImageDiffusionModel(mcfg)
    log.info("data: %d train / %d held-out images of %dx%dx%d", len(splits.train), len(splits.dev),
             mcfg.channels, mcfg.image_size, mcfg.image_size)
    log.info("model: U-Net %.2fM parameters (channels %d x %s), %s schedule, T=%s, predicts %s",
             sum(p.numel() for p in model.parameters()) / 1e6, mcfg.base_channels, mcfg.channel_mults,
             mcfg.schedule, mcfg.num_steps, mcfg.prediction)
    return Setup(None, splits.train, splits.dev, model, ImageObjective,
                 {"train_images": len(splits.train), "dev_images": len(splits.dev)})


def is_image_model(path) -> bool:
    return model_type(path) == ImageDiffusionConfig.model_type


def load_image_model(path, device="cpu") -> ImageDiffusionModel:
    if not is_image_model(path):
        raise DifflmError(f"{path} is not a difflm image model directory; train one with data.modality=image")
    with loading(path, "image model"):
        model = ImageDiffusionModel.from_pretrained(Path(path), local_files_only=True).to(device).eval()
    warn_if_unfinished(path)
    return model


@torch.no_grad()
def generate_images(model: ImageDiffusionModel, num_samples: int, steps: Optional[int] = None,
                    sampler="ddpm", seed: int = 0, batch_size: int = 64, progress=None) -> torch.Tensor:
    """uint8 samples (N, C, H, W); each x0 estimate is clipped to [-1, 1], the data's range. `sampler`: a
    sampling.Sampler or its name."""
    from .sampling import check_request, sample

    check_request(model.diffusion, num_samples, steps, batch_size, sampler=sampler)
    c = model.config
    p = next(model.parameters())
    g = torch.Generator(device=p.device).manual_seed(seed)
    out = []
    for i in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - i)
        x = sample(model.diffusion, model, (b, c.channels, c.image_size, c.image_size), steps=steps,
                   sampler=sampler, denoise_fn=lambda x0, t: x0.clamp(-1, 1), generator=g,
                   device=p.device, dtype=p.dtype)
        out.append(to_pixels(x).cpu())
        if progress:
            progress(b)
    return torch.cat(out)


def grid(images: torch.Tensor, columns: int, pad: int = 2) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) image, `columns` per row, `pad` pixels apart."""
    if columns < 1:
        raise DifflmError(f"the grid needs a positive number of columns, got {columns}")
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.zeros(c, rows * (h + pad) + pad, columns * (w + pad) + pad, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, columns)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return canvas.permute(1, 2, 0)


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (H, W, C) image as PNG atomically (a temporary file renamed into place)."""
    import io

    from PIL import Image

    from .files import atomic_write_bytes

    arr = image.numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


@dataclass
class BitsPerDim:
    images: int
    draws_per_image: int
    bits_per_dim: float
    se: float
    terms_bits_per_dim: Dict[str, float]  # reconstruction, diffusion, prior

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@torch.no_grad()
def bits_per_dim(model: ImageDiffusionModel, pixels: torch.Tensor, draws: int = 8, batch_size: int = 128,
                 seed: int = 0, progress=None) -> BitsPerDim:
    """Test bits/dim: -ELBO / (D ln 2) per image, the diffusion term stratified over t (metrics.stratified),
    with its standard error across images."""
    from .metrics import _estimate, stratified

    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    strata = model.diffusion.time_strata(draws, low_step=2)
    rows = []
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i: i + batch_size].to(device)
        rows.append(stratified(lambda s: vars(image_elbo(model, batch, g, stratum=s)), strata))
        if progress:
            progress(len(batch))
    terms = {k: torch.cat([r[k] for r in rows]) / (dims(model) * LN2) for k in rows[0]}
    total = sum(terms.values())
    est = _estimate(total)
    return BitsPerDim(images=len(pixels), draws_per_image=len(strata), bits_per_dim=est.mean, se=est.se,
                      terms_bits_per_dim={k: v.double().mean().item() for k, v in terms.items()})


def evaluate_images(model_dir: str, cfg: Config, args, command: str, sampler="ddpm") -> Path:
    """`difflm eval` of an image model: held-out bits/dim with its standard error, and a sample grid by `sampler`
    (a sampling.Sampler or its name); writes metrics.json, report.md and samples.png into args.out (atomically)."""
    import json

    from tqdm.auto import tqdm

    from .files import AtomicDir
    from .runtime import resolve_device
    from .sampling import as_sampler

    device = resolve_device(args.device)
    model = load_image_model(model_dir, device=device)
    pixels = load_images(cfg.data).dev[: args.held_out]
    with tqdm(total=len(pixels), desc="bits/dim", disable=args.no_progress, dynamic_ncols=True) as bar:
        bpd = bits_per_dim(model, pixels, draws=args.bound_draws, seed=args.seed, progress=bar.update)
    with tqdm(total=args.num_samples, desc="generate", disable=args.no_progress, dynamic_ncols=True) as bar:
        images = generate_images(model, args.num_samples, steps=args.steps, sampler=sampler, seed=args.seed,
                                 progress=bar.update)
    sampler = as_sampler(sampler)
    metrics = {"model": str(model_dir), "data": cfg.data.source, "split": cfg.data.dev_split,
               "bits_per_dim": bpd.to_dict(), "samples": len(images), "sampling_steps": args.steps,
               "sampler": sampler.describe()}
    terms = ", ".join(f"{k} {v:.4f}" for k, v in bpd.terms_bits_per_dim.items())
    report = (f"# Evaluation of {model_dir}\n\n`{command}`\n\n"
              f"- held-out images: {bpd.images} of {cfg.data.source} (split {cfg.data.dev_split})\n"
              f"- **bits/dim: {bpd.bits_per_dim:.4f} +- {bpd.se:.4f}** (upper bound on -log2 P(x) / D; "
              f"{bpd.draws_per_image} stratified draws of t per image)\n- terms (bits/dim): {terms}\n\n"
              f"![samples](samples.png)\n\n{len(images)} samples, {args.steps} steps ({sampler.describe()}).\n")
    out = Path(args.out)
    with AtomicDir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "report.md").write_text(report)
        save_png(grid(images, max(1, round(len(images) ** 0.5))), tmp / "samples.png")
    print(f"bits/dim {bpd.bits_per_dim:.4f} +- {bpd.se:.4f} on {bpd.images} held-out images ({terms})")
    return out
