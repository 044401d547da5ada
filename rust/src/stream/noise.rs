//! Online noise of a batch: per sample, the counter-based Gaussians and uniforms of
//! draw = epoch (`philox`), drawn when the consumer takes the batch (never for a whole window).

use rayon::prelude::*;

use super::{Batch, Ctx};
use crate::philox;

/// Online noise, draw = epoch: per sample `gaussians` standard normals (`philox::gaussian_into`)
/// and `uniforms` uniforms in (0, 1) (`philox::uniforms_into`; uniform 0 picks sigma). Either
/// count may be 0.
#[derive(Clone, Copy, Debug)]
pub struct NoiseSpec {
    pub seed: u64,
    pub block: u32,
    pub gaussians: usize,
    pub uniforms: usize,
}

const F64_BYTES: usize = std::mem::size_of::<f64>();

/// The online noise of one batch (Gaussians and uniforms of draw = epoch), its rows in parallel
/// on the stream's pool; `eps` goes into a buffer of the stream's pool, reused once the consumer
/// drops the batch.
pub(super) fn add_noise(ctx: &Ctx, mut b: Batch) -> Batch {
    let Some(ns) = ctx.spec.noise else {
        return b;
    };
    let (n, draw) = (b.indices.len(), b.epoch as u32);
    b.uniforms = vec![0.0f64; n * ns.uniforms];
    b.eps = ctx.buffers.take(n * ns.gaussians * F64_BYTES);
    ctx.pool.install(|| {
        if ns.gaussians > 0 {
            let row_bytes = ns.gaussians * F64_BYTES;
            b.eps
                .par_chunks_mut(row_bytes)
                .zip(b.indices.par_iter())
                .for_each_init(
                    || vec![0.0f64; ns.gaussians],
                    |row, (out, &s)| {
                        philox::gaussian_into(s as u32, ns.seed, ns.block, draw, row);
                        for (dst, v) in out.chunks_exact_mut(F64_BYTES).zip(row.iter()) {
                            dst.copy_from_slice(&v.to_ne_bytes());
                        }
                    },
                );
        }
        if ns.uniforms > 0 {
            b.uniforms
                .par_chunks_mut(ns.uniforms)
                .zip(b.indices.par_iter())
                .for_each(|(row, &s)| {
                    philox::uniforms_into(s as u32, ns.seed, ns.block, draw, row)
                });
        }
    });
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::error::Error;
    use crate::store::{ArraySpec, Compression, Store};
    use crate::stream::tests::spec;
    use crate::stream::Stream;
    use serde_json::Map;

    #[test]
    fn online_noise_of_any_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let x = s
            .create_array(
                "x",
                &ArraySpec {
                    shape: vec![30, 2],
                    dtype: DType::Int32,
                    chunk_rows: 4,
                    shard_rows: None,
                    compression: Compression::Zstd(1),
                },
            )
            .unwrap();
        x.write_rows(0, &[0u8; 30 * 8]).unwrap();
        s.finalize().unwrap();
        let (seed, block) = (2u64.pow(33) + 5, 1u32);
        for (g, u) in [(0, 3), (10, 1), (7, 5), (0, 8), (3, 0), (0, 0)] {
            let mut sp = spec(&[("x", false)], 7);
            sp.noise = Some(NoiseSpec {
                seed,
                block,
                gaussians: g,
                uniforms: u,
            });
            let mut st = Stream::open(&path, sp).unwrap();
            for epoch in 0..2u64 {
                let draw = epoch as u32;
                st.start(epoch, 0);
                while let Some(b) = st.next_batch() {
                    let b = b.unwrap();
                    let m = b.indices.len();
                    let eps: Vec<f64> = b
                        .eps
                        .chunks_exact(F64_BYTES)
                        .map(|c| f64::from_ne_bytes(c.try_into().unwrap()))
                        .collect();
                    assert_eq!((eps.len(), b.uniforms.len()), (m * g, m * u));
                    for (i, &r) in b.indices.iter().enumerate() {
                        let r = r as u32;
                        let mut eg = vec![0.0; g];
                        philox::gaussian_into(r, seed, block, draw, &mut eg);
                        assert_eq!(&eps[i * g..(i + 1) * g], &eg[..]);
                        let row = &b.uniforms[i * u..(i + 1) * u];
                        let mut eu = vec![0.0; u];
                        philox::uniforms_into(r, seed, block, draw, &mut eu);
                        assert_eq!(row, &eu[..]);
                        if u > 0 {
                            assert_eq!(row[0], philox::uniform_for_sigma(r, seed, block, draw));
                        }
                        if u >= 7 {
                            let mix = philox::philox4x32(
                                [philox::MIX_GROUP, r, block, draw],
                                philox::key_of(seed),
                            );
                            assert_eq!(&row[4..7], &mix.map(philox::uniform)[..3]);
                        }
                    }
                }
            }
        }
        let mut sp = spec(&[("x", false)], 7);
        sp.noise = Some(NoiseSpec {
            seed,
            block,
            gaussians: 1 << 34,
            uniforms: 1 << 33,
        });
        match Stream::open(&path, sp) {
            Err(Error::Invalid(m)) => assert!(m.contains("would meet"), "{m}"),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("an overlapping noise request was accepted"),
        }
    }
}
