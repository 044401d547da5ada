"""Class-conditional DiT generator recipe (METHOD.md 7, 11 "DiT"): blocks, baseline, sampler, FID.

The target y is the image in [-1, 1] (N, C, H, W); block b denoises it over its own noise range
with the loss `w(sigma) * mean((D - y)^2)` per sample (the MSE kernel on CUDA, its reference
elsewhere). The class is replaced by the null class with probability `class_drop` (uniform 1 of
the sample's counter-based draws, so reruns and resumes drop the same labels). The baseline is the
same DiT depth trained end to end over the whole log-normal range and sampled by the same Euler
grid. Guidance acts on D inside every step: `D = D_uncond + s (D_cond - D_uncond)`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from dbcore.kernels import block_loss_mse
from dbcore.method import layout
from dbcore.method.batch import Batch, Noised, NoiseRequest
from dbcore.method.options import Options
from dbcore.method.sampler import initial_noise, run_chain
from dbcore.metrics import fid
from dbcore.models.dit import DiTBlock, DiTConfig, DiTModel, drop_labels
from dbcore.models.images import check_image_source, example_image_batch
from dbcore.recipes.base import Recipe

SAMPLE_BATCH = 500
DEFAULT_EVAL_SAMPLES = 2000
SAMPLERS = ("euler", "heun")


def images_to_target(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def target_to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in about [-1, 1] -> uint8 (N, H, W, C), clipped."""
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


class DiTRecipe(Recipe):
    """DiT on pixels: continuous target, adaLN-Zero conditioned on noise level + class, CFG."""

    name = "dit"
    config_class = DiTConfig
    stream_arrays = (layout.IMAGES, layout.LABELS)
    augmented = layout.IMAGES
    augment_changes_targets = True  # cached noised targets would be of the unaugmented images
    cond_arrays = (layout.LABELS,)
    frozen_arrays = ()
    cache_fields = ("image_size", "channels", "num_classes")
    generates = True
    fid_reference = True
    e2e_noise = True

    # ------------------------------------------------------------------ cache and noise

    def cache_arrays(self, source, seed, target_embedding):
        m = self.model_cfg
        check_image_source(source, m.image_size, m.channels, m.num_classes)
        return {layout.IMAGES: source.images, layout.LABELS: source.labels}, {}

    def target_shape(self, frozen):
        m = self.model_cfg
        return (m.channels, m.image_size, m.image_size)

    def noise_request(self, target_shape):
        return NoiseRequest(gaussians=math.prod(target_shape), uniforms=2)  # sigma, class drop

    def targets(self, batch, frozen):
        return images_to_target(batch[layout.IMAGES])  # (N, C, H, W)

    # ------------------------------------------------------------------ models and the loss

    def build_block(self, block, frozen):
        return DiTBlock(self.model_cfg, block)

    def build_e2e(self, frozen):
        return DiTModel(self.model_cfg)

    def _loss(self, model: nn.Module, batch: Batch, noised: Noised, w: torch.Tensor, backend: str
              ) -> torch.Tensor:
        m = self.model_cfg
        labels = batch[layout.LABELS]
        if noised.uniforms is None or noised.uniforms.shape[1] < 2:
            raise ValueError("the DiT loss needs the class-drop uniform (uniform 1) with the noise")
        dropped = drop_labels(labels, noised.uniforms[:, 1].to(labels.device) < m.class_drop, m.num_classes)
        y = self.targets(batch, {})  # (N, C, H, W)
        raw = model.denoiser.raw(noised.z, noised.sigma, dropped)  # F (N, C, H, W)
        return block_loss_mse(noised.z, raw, y, noised.sigma.detach(), w, backend=backend)

    def block_loss(self, block, batch, noised, w, backend="torch"):
        return self._loss(block, batch, noised, w, backend)

    def e2e_loss(self, model, batch, noised, w, backend="torch"):
        return self._loss(model, batch, noised, w, backend)

    def example_batch(self, batch_size, frozen, device):
        return example_image_batch(self.model_cfg, batch_size, device)

    # ------------------------------------------------------------------ sampling

    def to_images(self, x: torch.Tensor) -> np.ndarray:
        """Samples in target space -> uint8 (N, H, W, C)."""
        return target_to_images(x)

    def denoise_step(self, block, cond, z, sigma, options):
        scale = 1.0 if options.cfg_scale is None else options.cfg_scale
        labels = cond[layout.LABELS]
        if scale == 1.0:
            return block(z, sigma, labels), None
        return block.forward_with_cfg(z, sigma, labels, scale), None

    def generate(self, load_block: Any, num_blocks: int, labels: torch.Tensor, num_steps: int,
                 cfg_scale: float, seed: int = 0, sampler: str = "euler") -> torch.Tensor:
        """Samples (N, C, H, W) in target space for classes `labels` (N,); initial noise keyed by
        (seed, sample index 0..N-1). `num_blocks=1` samples an end-to-end model."""
        m = self.model_cfg
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        bad = labels[(labels < 0) | (labels >= m.num_classes)]
        if len(bad):
            raise ValueError(f"class {int(bad[0])} is outside 0..{m.num_classes - 1}")
        n = len(labels)
        z0 = initial_noise(torch.arange(n), self.target_shape({}), num_blocks, seed)
        return run_chain(self, load_block, {layout.LABELS: labels}, z0, num_blocks, num_steps,
                         batch_size=SAMPLE_BATCH, options=Options(cfg_scale=cfg_scale),
                         heun=sampler == "heun")

    def sampling(self, options: Options) -> tuple[int, float, int, str]:
        """(steps, cfg_scale, seed, sampler): the options given, else the run's config."""
        m, t = self.model_cfg, self.cfg.train
        return (options.steps or m.sample_steps,
                m.cfg_scale if options.cfg_scale is None else options.cfg_scale,
                t.seed if options.seed is None else options.seed,
                options.sampler or m.sampler)

    def sample(self, load_block: Any, e2e: nn.Module | None, labels: torch.Tensor, options: Options
               ) -> torch.Tensor:
        """`dbcore sample`: samples of a run (blocks through `load_block`, or the baseline)."""
        m = self.model_cfg
        steps, scale, seed, sampler = self.sampling(options)
        if e2e is not None:
            return self.generate(lambda b: e2e, 1, labels, steps, scale, seed, sampler)
        return self.generate(load_block, m.num_blocks, labels, steps, scale, seed, sampler)

    def evaluate(self, load_block, e2e, source, options):
        """fid (Frechet distance in the features of the project's reference classifier, NOT
        comparable with Inception FID), class_accuracy of the generated samples against their
        class, and the floor: the FID of as many real training images against `source`."""
        m = self.model_cfg
        t0 = time.perf_counter()
        check_image_source(source, m.image_size, m.channels, m.num_classes)
        if options.reference is None:
            raise ValueError("DiT evaluation needs the FID reference network (dbcore.runs.reference)")
        ref = options.reference
        net, ref_meta, train_images = ref.net, ref.meta, ref.train_images
        n = int(options.num_samples or DEFAULT_EVAL_SAMPLES)
        labels = torch.arange(n) % m.num_classes
        samples = self.sample(load_block, e2e, labels, options)  # (n, C, H, W)
        steps, scale, _, sampler = self.sampling(options)
        real = images_to_target(torch.from_numpy(np.ascontiguousarray(source.images)))
        mu_r, cov_r = fid.feature_stats(net, real)
        mu_g, cov_g = fid.feature_stats(net, samples)
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(train_images), generator=g)[:n]
        floor = images_to_target(torch.from_numpy(train_images[pick.numpy()]))
        mu_f, cov_f = fid.feature_stats(net, floor)
        return {
            "fid": fid.frechet_distance(mu_g, cov_g, mu_r, cov_r),
            "class_accuracy": fid.class_accuracy(net, samples, labels),
            "num_samples": n,
            "fid_floor": fid.frechet_distance(mu_f, cov_f, mu_r, cov_r),
            "num_real": len(real),
            "cfg_scale": scale,
            "inference_steps": steps,
            "sampler": sampler,
            "reference": {k: ref_meta[k] for k in ("valid_accuracy", "key") if k in ref_meta},
            "seconds": round(time.perf_counter() - t0, 3),
        }
