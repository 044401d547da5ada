"""A reference digit classifier and the Frechet distance in its features (the project's own "FID").

Inception FID does not fit 1-channel 8x8 or 28x28 digits, so generated digits are scored with a small
CNN (`RefNet`) trained here on the real training images: the Frechet distance between Gaussians
fitted to its penultimate features, and its class accuracy on class-conditional samples.
These numbers are NOT comparable with Inception FID (or with any number computed with another
reference network, seed or FID_VERSION); compare them only within this project.

Images enter every function as float (N, C, H, W) in [-1, 1] (the generator's target space); real
uint8 images map by x / 127.5 - 1 (`images_to_tensor`). A trained network is cached as safetensors +
JSON under a key of its training source, seed and settings (`dbcore.runs.reference`), never pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

FID_VERSION = 1  # bump when the network, its training or the statistics change
CONV_WIDTHS = (32, 64, 128)
MIN_STEPS = 1500  # epochs=None trains ceil(MIN_STEPS / steps per epoch) epochs, at least MIN_EPOCHS
MIN_EPOCHS = 4
DEFAULT_BATCH_SIZE = 128
LR = 2e-3
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
FD_EPS = 1e-6  # added to the covariances' diagonals when sqrtm(C1 C2) is not finite


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class RefNet(nn.Module):
    """conv32 - pool - conv64 - pool - conv128 - fc feature_dim - ReLU - fc classes (3x3 convs, BN)."""

    def __init__(self, channels: int, image_size: int, num_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        w1, w2, w3 = CONV_WIDTHS
        self.sizes = dict(channels=channels, image_size=image_size, num_classes=num_classes,
                          feature_dim=feature_dim)
        self.convs = nn.Sequential(
            _conv(channels, w1), nn.MaxPool2d(2), _conv(w1, w2), nn.MaxPool2d(2), _conv(w2, w3)
        )
        side = image_size // 2 // 2
        self.fc = nn.Linear(w3 * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [-1, 1] -> penultimate features (N, feature_dim), after the ReLU."""
        h = self.convs(x)  # (N, 128, H/4, W/4)
        return F.relu(self.fc(h.flatten(1)))  # (N, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [-1, 1] -> logits (N, classes)."""
        return self.head(self.features(x))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x[..., None] if x.dim() == 3 else x  # (N, H, W, C)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to max_shift pixels per axis, filling with the background -1."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, C, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=g)  # (N, 1) each
    rows = dy + torch.arange(h)  # (N, H)
    cols = dx + torch.arange(w)  # (N, W)
    i = torch.arange(n)[:, None, None, None]
    ch = torch.arange(c)[None, :, None, None]
    return padded[i, ch, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup then cosine decay to 0."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_reference(
    images: np.ndarray,
    labels: np.ndarray,
    valid_images: np.ndarray,
    valid_labels: np.ndarray,
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    feature_dim: int = 128,
    max_shift: int | None = None,
) -> tuple[RefNet, float]:
    """Train a RefNet on uint8 images (N, H, W[, C]) on the CPU; returns it (eval mode) and valid accuracy.

    Seeded: torch.manual_seed for the weights, a torch.Generator for shuffling and the random shifts
    (max_shift None = max(1, round(image_size / 14)): 2 px on 28x28, 1 px on 8x8). epochs None = enough
    for MIN_STEPS steps (4 on MNIST, 137 on sklearn digits). Bitwise repeatable for a fixed thread count.
    """
    x = images_to_tensor(images)  # (N, C, H, W)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    xv = images_to_tensor(valid_images)
    yv = torch.as_tensor(np.asarray(valid_labels), dtype=torch.long)
    n, c, size, _ = x.shape
    num_classes = int(max(y.max(), yv.max())) + 1
    shift = max(1, round(size / 14)) if max_shift is None else max_shift
    steps_per_epoch = math.ceil(n / batch_size)
    epochs = auto_epochs(n, batch_size) if epochs is None else epochs
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        net = RefNet(c, size, num_classes, feature_dim)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
        net.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for k in range(steps_per_epoch):
                idx = order[k * batch_size : (k + 1) * batch_size]
                xb = random_shift(x[idx], shift, g)  # (B, C, H, W)
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        return net, class_accuracy(net, xv, yv)
    finally:
        torch.set_num_threads(old_threads)


def auto_epochs(num_train: int, batch_size: int) -> int:
    return max(MIN_EPOCHS, math.ceil(MIN_STEPS / math.ceil(num_train / batch_size)))


def cache_key(
    train_source_sha256: str, seed: int, epochs: int | None, batch_size: int, feature_dim: int
) -> str:
    """sha256 over the training source, seed, FID_VERSION and the network's and training's settings."""
    spec = dict(
        source=train_source_sha256, seed=seed, fid_version=FID_VERSION, conv_widths=list(CONV_WIDTHS),
        feature_dim=feature_dim, epochs=epochs if epochs is not None else f"auto-{MIN_STEPS}-{MIN_EPOCHS}",
        batch_size=batch_size, lr=LR, weight_decay=WEIGHT_DECAY,
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _batched_features(net: nn.Module, images: torch.Tensor, batch_size: int, head: bool) -> torch.Tensor:
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            xb = images[k : k + batch_size].to(device, torch.float32)
            out.append((net(xb) if head else net.features(xb)).cpu())
    net.train(was_training)
    return torch.cat(out)


def feature_stats(net: RefNet, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """images (N, C, H, W) in [-1, 1] -> mean (F,) and covariance (F, F) of the features, float64."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    feats = _batched_features(net, images, batch_size, head=False).double().numpy()  # (N, F)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)) of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # features that never fire make C1 C2 singular: handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise both covariances
        offset = np.eye(cov1.shape[0]) * FD_EPS
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)  # sqrtm of a product of PSD matrices has eigenvalues >= 0; drop round-off
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def class_accuracy(net: RefNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images (N, C, H, W) in [-1, 1] that net classifies as labels (N,)."""
    logits = _batched_features(net, images, batch_size, head=True)  # (N, classes)
    labels = torch.as_tensor(labels).cpu()
    return float((logits.argmax(1) == labels).double().mean())
