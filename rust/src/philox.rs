//! Philox4x32-10 and the Box-Muller Gaussians of `python/dbcore/rng.py`, bit for bit in the
//! integer part (the counter layout is the contract documented there):
//!
//! - key = (seed mod 2^32, seed >> 32 mod 2^32)
//! - counter = (j, sample, block, draw); Gaussian element e comes from group j = e / 4, output e % 4;
//!   outputs (0, 1) and (2, 3) are Box-Muller pairs of u = (x + 0.5) 2^-32
//! - a noise request is (seed, block, gaussians, uniforms): per sample `gaussians` standard normals
//!   (the layout above, `gaussian_into`) and `uniforms` uniforms in (0, 1) (`uniforms_into`).
//!   Uniform k comes from group j = `SIGMA_GROUP` - k / 4 (counting down from 0xFFFFFFFF), output
//!   k % 4, u = (x + 0.5) 2^-32.
//!   Uniform 0 is the uniform that picks sigma (`SIGMA_GROUP`, output 0); uniforms 4..6 are the
//!   uniforms of target mixing (`MIX_GROUP` = 0xFFFFFFFE, outputs 0..2, `dbcore.noise`), the same
//!   counter: a recipe that mixes targets must not request more than 4 uniforms for anything else.
//! - Gaussian groups count up from 0, uniform groups down from 2^32 - 1: a request where they would
//!   meet (gaussians / 4 + uniforms / 4 + 2 > 2^32) is refused (`check_request`).
//!
//! Uniforms are exact. The Gaussians use the platform's f64 `ln`, `sqrt`, `cos`, `sin`; PyTorch's
//! vectorised CPU kernels may round differently in the last bit of an f64 (never visible after
//! the float32 cast of a noised target but for rare ties).

pub const M0: u32 = 0xD251_1F53;
pub const M1: u32 = 0xCD9E_8D57;
pub const W0: u32 = 0x9E37_79B9;
pub const W1: u32 = 0xBB67_AE85;
pub const ROUNDS: usize = 10;
pub const SIGMA_GROUP: u32 = 0xFFFF_FFFF;
/// The group of target mixing's uniforms: uniforms 4..6 of a sample (outputs 0..2).
pub const MIX_GROUP: u32 = 0xFFFF_FFFE;
const INV_2_32: f64 = 1.0 / 4_294_967_296.0;

#[inline]
fn mulhilo(m: u32, x: u32) -> (u32, u32) {
    let p = m as u64 * x as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32-10 of `ctr` under `key`.
#[inline]
pub fn philox4x32(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for r in 0..ROUNDS {
        if r > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// The key of a 64-bit seed.
#[inline]
pub fn key_of(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// u = (x + 0.5) 2^-32, in (0, 1).
#[inline]
pub fn uniform(x: u32) -> f64 {
    (x as f64 + 0.5) * INV_2_32
}

/// The sigma uniform of `sample` (rng.uniform_for_sigma).
pub fn uniform_for_sigma(sample: u32, seed: u64, block: u32, draw: u32) -> f64 {
    uniform(philox4x32([SIGMA_GROUP, sample, block, draw], key_of(seed))[0])
}

/// Whether a request of `gaussians` Gaussians and `uniforms` uniforms per sample fits the counter:
/// the Gaussian groups (up from 0) and the uniform groups (down from 2^32 - 1) must not meet.
pub fn check_request(gaussians: usize, uniforms: usize) -> Result<(), String> {
    if (gaussians as u128 / 4) + (uniforms as u128 / 4) + 2 > 1u128 << 32 {
        return Err(format!(
            "a noise request of {gaussians} Gaussians and {uniforms} uniforms per sample does not \
             fit the generator's 32-bit counter: the Gaussian groups (from 0 up) and the uniform \
             groups (from 2^32 - 1 down) would meet"
        ));
    }
    Ok(())
}

/// Uniforms in (0, 1) of one sample (rng.uniforms_of), `out.len()` of them: uniform k from group
/// `SIGMA_GROUP - k / 4`, output k % 4 (one Philox call per group of four).
pub fn uniforms_into(sample: u32, seed: u64, block: u32, draw: u32, out: &mut [f64]) {
    let key = key_of(seed);
    for (g, group) in out.chunks_mut(4).enumerate() {
        let x = philox4x32([SIGMA_GROUP - g as u32, sample, block, draw], key);
        for (o, &v) in group.iter_mut().zip(&x) {
            *o = uniform(v);
        }
    }
}

/// Standard normal noise of one sample (rng.gaussian), `out.len()` elements.
pub fn gaussian_into(sample: u32, seed: u64, block: u32, draw: u32, out: &mut [f64]) {
    let key = key_of(seed);
    for (j, group) in out.chunks_mut(4).enumerate() {
        let x = philox4x32([j as u32, sample, block, draw], key);
        let u = x.map(uniform);
        let r01 = (-2.0 * u[0].ln()).sqrt();
        let r23 = (-2.0 * u[2].ln()).sqrt();
        let a01 = 2.0 * std::f64::consts::PI * u[1];
        let a23 = 2.0 * std::f64::consts::PI * u[3];
        let n = [
            r01 * a01.cos(),
            r01 * a01.sin(),
            r23 * a23.cos(),
            r23 * a23.sin(),
        ];
        group.copy_from_slice(&n[..group.len()]);
    }
}

/// A stream of random u64 keyed by (seed, tag), for shuffles: output i is Philox of
/// counter (i mod 2^32, i >> 32, tag[0], tag[1]), two u32 words joined.
pub struct Counter {
    key: [u32; 2],
    tag: [u32; 2],
    i: u64,
}

impl Counter {
    pub fn new(seed: u64, tag: [u32; 2]) -> Self {
        Counter {
            key: key_of(seed),
            tag,
            i: 0,
        }
    }

    /// Jump `n` outputs ahead (to give independent sub-streams disjoint counter ranges).
    pub fn skip(&mut self, n: u64) {
        self.i = self.i.wrapping_add(n);
    }

    pub fn next_u64(&mut self) -> u64 {
        let x = philox4x32(
            [
                self.i as u32,
                (self.i >> 32) as u32,
                self.tag[0],
                self.tag[1],
            ],
            self.key,
        );
        self.i += 1;
        ((x[0] as u64) << 32) | x[1] as u64
    }

    /// A uniform integer in 0..n (n >= 1), by a 128-bit multiply (bias below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher-Yates shuffle of `v` in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32([0; 4], [0; 2]),
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
        );
        assert_eq!(
            philox4x32([u32::MAX; 4], [u32::MAX; 2]),
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
        );
        assert_eq!(
            philox4x32(
                [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
                [0xA4093822, 0x299F31D0]
            ),
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
        );
    }

    #[test]
    fn gaussian_moments_and_prefix() {
        let mut all = Vec::new();
        for s in 0..256 {
            let mut g = vec![0.0; 130];
            gaussian_into(s, 7, 1, 0, &mut g);
            let mut short = vec![0.0; 63];
            gaussian_into(s, 7, 1, 0, &mut short);
            assert_eq!(&g[..63], &short[..]);
            all.extend(g);
        }
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
        let u = uniform_for_sigma(3, 3, 0, 1);
        assert!(u > 0.0 && u < 1.0);
    }

    #[test]
    fn uniforms_layout() {
        let key = key_of(2u64.pow(40) + 9);
        for s in [0u32, 1, 77, u32::MAX] {
            let mut u = vec![0.0; 11];
            uniforms_into(s, 2u64.pow(40) + 9, 3, 5, &mut u);
            assert_eq!(u[0], uniform_for_sigma(s, 2u64.pow(40) + 9, 3, 5));
            let mix = philox4x32([MIX_GROUP, s, 3, 5], key);
            assert_eq!(&u[4..7], &mix.map(uniform)[..3]);
            let third = philox4x32([SIGMA_GROUP - 2, s, 3, 5], key);
            assert_eq!(&u[8..11], &third.map(uniform)[..3]);
            assert!(u.iter().all(|&v| v > 0.0 && v < 1.0));
            let mut short = vec![0.0; 5];
            uniforms_into(s, 2u64.pow(40) + 9, 3, 5, &mut short);
            assert_eq!(&u[..5], &short[..]);
        }
        let mut none: [f64; 0] = [];
        uniforms_into(0, 1, 2, 3, &mut none);
    }

    #[test]
    fn request_limits() {
        assert!(check_request(0, 0).is_ok());
        assert!(check_request(1 << 20, 1 << 20).is_ok());
        // 2^32 groups in all: gaussians / 4 + uniforms / 4 + 2 <= 2^32
        let g = (1usize << 33) - 4; // 2^31 - 1 groups
        assert!(check_request(g, g).is_ok());
        assert!(check_request(g + 4, g).is_err());
        assert!(check_request(usize::MAX, 0).is_err());
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Counter::new(5, [1, 2]).shuffle(&mut v);
        let mut w = v.clone();
        Counter::new(5, [1, 2]).shuffle(&mut (0..1000).collect::<Vec<u32>>());
        w.sort_unstable();
        assert_eq!(w, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
    }
}
