"""Image augmentation at training time, per sample, from the counter-based draws: a random crop of
the image padded with `crop` zero pixels on each side, and a horizontal flip with probability 1/2.

The draws are keyed by (seed, sample index, DATA_BLOCK, epoch), group AUGMENT_GROUP
(`dbcore.method.rng`): every block and the baseline see the same augmented image of a sample in an
epoch, and a resumed run draws what it would have drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbcore.method import rng


def augment_images(images: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, crop: int,
                   flip: bool) -> torch.Tensor:
    """images (N, H, W, C) -> the same shape, each row cropped and flipped by its own draws."""
    if crop == 0 and not flip:
        return images
    n, h, w, _ = images.shape
    u = rng.uniforms(index.cpu(), seed, rng.DATA_BLOCK, epoch, rng.AUGMENT_GROUP).to(images.device)  # (N, 4)
    out = images
    if crop > 0:
        padded = F.pad(images, (0, 0, crop, crop, crop, crop))  # (N, H + 2c, W + 2c, C)
        dx = (u[:, 0] * (2 * crop + 1)).long()  # offsets 0..2c, uniform
        dy = (u[:, 1] * (2 * crop + 1)).long()
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, W)
        out = padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]  # (N, H, W, C)
    if flip:
        out = torch.where((u[:, 2] < 0.5)[:, None, None, None], out.flip(2), out)
    return out
