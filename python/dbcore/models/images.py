"""What the image recipes share beside their networks: the check of a source against the config, and
a random batch shaped like a streamed one (benchmarks)."""

from __future__ import annotations

from typing import Any

import torch

from dbcore.method import layout
from dbcore.method.batch import INDEX


def check_image_source(source: Any, image_size: int, channels: int, num_classes: int) -> None:
    """Refuse a source whose images or labels do not fit the config (one clear line)."""
    if not hasattr(source, "images"):
        raise ValueError(f"source {source.spec}: an image recipe needs labelled images (digits or npz:PATH)")
    _, h, w, c = source.images.shape
    if (h, w, c) != (image_size, image_size, channels):
        raise ValueError(f"source {source.spec}: images are {h}x{w}x{c}, the config expects "
                         f"{image_size}x{image_size}x{channels}")
    if source.num_classes > num_classes:
        raise ValueError(f"source {source.spec}: label {source.num_classes - 1} >= num_classes {num_classes}")


def example_image_batch(m: Any, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A seeded random batch of uint8 images and labels shaped by an image recipe's config `m`."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, m.image_size, m.image_size, m.channels), generator=g)
    labels = torch.randint(0, m.num_classes, (batch_size,), generator=g)
    return {layout.IMAGES: images.to(device, torch.uint8), layout.LABELS: labels.to(device),
            INDEX: torch.arange(batch_size, device=device)}
