"""Counter-based noise: Philox4x32-10, keyed by (seed, sample index, block, draw).

The PyTorch reference of the generator that the Rust store (`dbcore._native`) and the CUDA
kernels (`cuda/philox.cuh`) implement bit for bit, so every process, machine and backend draws the
same noise.

Layout (the contract, shared by all three implementations):
- key     = (seed mod 2^32, seed >> 32 mod 2^32)
- counter = (j, sample, block, draw), all uint32; `block` is the network block index
  (0 = first block = highest noise), `draw` the cached draw k (or the epoch for online noise).
- Gaussian element e of a sample's noise comes from group j = e // 4, output r = e % 4.
  Outputs (0, 1) and (2, 3) are Box-Muller pairs with u = (x + 0.5) * 2^-32 in (0, 1):
  n_even = sqrt(-2 ln u_a) cos(2 pi u_b), n_odd = sqrt(-2 ln u_a) sin(2 pi u_b).
- A noise request is (seed, block, gaussians, uniforms): per sample `gaussians` standard normals
  (the layout above) and `uniforms` uniforms in (0, 1) (`uniforms_of`). Uniform k of a sample
  comes from group j = SIGMA_GROUP - k // 4 (counting down from 0xFFFFFFFF), output k % 4, with
  the same u = (x + 0.5) * 2^-32.
- Uniform 0 (group SIGMA_GROUP, output 0) is the uniform that picks sigma (`uniform_for_sigma`).
- The uniforms of target mixing (`dbcore.runs.train`, `mix_fraction`) use group j = MIX_GROUP
  (0xFFFFFFFE), outputs 0..2: they are uniforms 4..6 of the same counter. A recipe that mixes
  targets must therefore not request more than 4 uniforms for anything else.
- Data draws (the offset of a text window, `dbcore.data.stream`) use block = DATA_BLOCK
  (0xFFFFFFFF, no network block's index) and draw = epoch: the same for every block of a run.
  Image augmentation (`dbcore.method.augment`) uses the same counter's group AUGMENT_GROUP
  (0xFFFFFFFD), outputs 0..2 (crop offsets x and y, flip).
- Gaussian groups count up from 0, uniform groups down from 2^32 - 1; a request where they would
  meet (gaussians // 4 + uniforms // 4 + 2 > 2^32) is refused (`check_request`).

Integer arithmetic runs in int64 with explicit 32-bit masks (torch has no full uint32 support).
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SIGMA_GROUP = 0xFFFFFFFF
MIX_GROUP = 0xFFFFFFFE
DATA_BLOCK = 0xFFFFFFFF
AUGMENT_GROUP = 0xFFFFFFFD
MASK32 = 0xFFFFFFFF
INV_2_32 = 2.0**-32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64 bit product in int64: wraps on overflow, the masks recover both halves exactly.
    p = x * m
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of int64 tensors holding uint32 values; returns four uint32-valued tensors."""
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return (x.to(torch.float64) + 0.5) * INV_2_32


def _counters(
    j: torch.Tensor, sample: torch.Tensor, block: int, draw: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if sample.numel() and (int(sample.max()) > MASK32 or int(sample.min()) < 0):
        raise ValueError("sample index does not fit the generator's 32-bit counter")
    j, sample = torch.broadcast_tensors(j, sample)
    return j, sample, torch.full_like(j, block), torch.full_like(j, draw)


def uniforms(sample: torch.Tensor, seed: int, block: int, draw: int, group: int) -> torch.Tensor:
    """The four uniforms in (0, 1) (float64) of counter group `group`: (N, 4)."""
    sample = sample.to(torch.int64)
    j = torch.full_like(sample, group)
    return torch.stack([_uniform(v) for v in philox4x32(_counters(j, sample, block, draw), seed)], dim=1)


def check_request(gaussians: int, uniforms: int) -> None:
    """Refuse a noise request whose Gaussian groups (up from 0) and uniform groups (down from
    2^32 - 1) would meet on the 32-bit counter."""
    if gaussians < 0 or uniforms < 0:
        raise ValueError(f"noise counts must be >= 0, got gaussians={gaussians}, uniforms={uniforms}")
    if gaussians // 4 + uniforms // 4 + 2 > 2**32:
        raise ValueError(
            f"a noise request of {gaussians} Gaussians and {uniforms} uniforms per sample does not fit "
            "the generator's 32-bit counter: the Gaussian groups (from 0 up) and the uniform groups "
            "(from 2^32 - 1 down) would meet"
        )


def uniforms_of(sample: torch.Tensor, count: int, seed: int, block: int, draw: int) -> torch.Tensor:
    """`count` uniforms in (0, 1) per sample (float64, (len(sample), count)): uniform k from group
    SIGMA_GROUP - k // 4, output k % 4. Column 0 is `uniform_for_sigma`; columns 4..6 are target
    mixing's MIX_GROUP outputs 0..2."""
    check_request(0, count)
    sample = sample.to(torch.int64)
    groups = (count + 3) // 4
    j = SIGMA_GROUP - torch.arange(groups, dtype=torch.int64)[None, :]  # (1, G)
    x = philox4x32(_counters(j, sample[:, None], block, draw), seed)  # 4 x (N, G)
    u = torch.stack([_uniform(v) for v in x], dim=-1)  # (N, G, 4)
    return u.reshape(len(sample), groups * 4)[:, :count]


def uniform_for_sigma(sample: torch.Tensor, seed: int, block: int, draw: int) -> torch.Tensor:
    """One uniform in (0, 1) per sample (float64), from which the block's sigma is drawn."""
    sample = sample.to(torch.int64)
    j = torch.full_like(sample, SIGMA_GROUP)
    x0, _, _, _ = philox4x32(_counters(j, sample, block, draw), seed)
    return _uniform(x0)


def gaussian(
    sample: torch.Tensor, num_elements: int, seed: int, block: int, draw: int
) -> torch.Tensor:
    """Standard normal noise of shape (len(sample), num_elements), float64."""
    sample = sample.to(torch.int64)
    groups = (num_elements + 3) // 4
    j = torch.arange(groups, dtype=torch.int64)[None, :]  # (1, G)
    x = philox4x32(_counters(j, sample[:, None], block, draw), seed)  # 4 x (N, G)
    u = [_uniform(v) for v in x]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    a01, a23 = 2.0 * math.pi * u[1], 2.0 * math.pi * u[3]
    n = torch.stack(
        [r01 * torch.cos(a01), r01 * torch.sin(a01), r23 * torch.cos(a23), r23 * torch.sin(a23)],
        dim=-1,
    )  # (N, G, 4)
    return n.reshape(len(sample), groups * 4)[:, :num_elements]
