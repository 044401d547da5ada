//! Encoded images (JPEG, PNG, WebP) decoded in parallel into rows of one shape, `size` x `size` x
//! `channels` u8 (`dbcore.data.decode` holds the Pillow reference of the same rules):
//! - grey-scale is Pillow's `L`, ITU-R 601-2 luma (R 299, G 587, B 114 per mille), from RGB;
//! - an image of another size is resized so that its shorter side is `size` (bicubic, Catmull-Rom,
//!   antialiased when shrinking), the longer side rounded half up, then centre-cropped (offset
//!   rounded down).
//!
//! An image that does not decode is reported by index, not fatal: the caller tries its reference
//! decoder and names the file.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rayon::prelude::*;

/// The resized size of (w, h): the shorter side `size`, the longer one scaled, rounded half up.
pub fn resized_dims(w: u32, h: u32, size: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| {
        let v = (2 * long as u64 * size as u64 + short as u64) / (2 * short as u64);
        (v as u32).max(size)
    };
    if w <= h {
        (size, scale(h, w))
    } else {
        (scale(w, h), size)
    }
}

/// ITU-R 601-2 luma of RGB pixels, in Pillow's fixed point.
fn luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

fn pixels(bytes: &[u8], channels: usize) -> Result<(Vec<u8>, u32, u32), String> {
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let (w, h) = (img.width(), img.height());
    let rgb = match img {
        image::DynamicImage::ImageLuma8(g) if channels == 1 => return Ok((g.into_raw(), w, h)),
        other => other.into_rgb8().into_raw(),
    };
    Ok((if channels == 1 { luma(&rgb) } else { rgb }, w, h))
}

/// One image into `out` (size * size * channels bytes).
fn decode_one(
    resizer: &mut Resizer,
    bytes: &[u8],
    size: u32,
    channels: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let (raw, w, h) = pixels(bytes, channels)?;
    let ty = if channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let src = Image::from_vec_u8(w, h, raw, ty).map_err(|e| e.to_string())?;
    let fitted = if (w, h) == (size, size) {
        src
    } else {
        let (nw, nh) = resized_dims(w, h, size);
        let mut dst = Image::new(nw, nh, ty);
        let options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
        resizer
            .resize(&src, &mut dst, &options)
            .map_err(|e| e.to_string())?;
        dst
    };
    let (w, h) = (fitted.width() as usize, fitted.height() as usize);
    let (s, c) = (size as usize, channels);
    let (x0, y0) = ((w - s) / 2, (h - s) / 2);
    let buf = fitted.buffer();
    for (y, row) in out.chunks_exact_mut(s * c).enumerate() {
        let start = ((y0 + y) * w + x0) * c;
        row.copy_from_slice(&buf[start..start + s * c]);
    }
    Ok(())
}

/// Decode `blobs` into `out` (len(blobs) rows of size * size * channels bytes), in parallel; the
/// images that fail, as (index, message).
pub fn decode_into(
    blobs: &[&[u8]],
    size: u32,
    channels: usize,
    out: &mut [u8],
) -> Vec<(usize, String)> {
    assert!(channels == 1 || channels == 3, "channels must be 1 or 3");
    let row = size as usize * size as usize * channels;
    assert_eq!(out.len(), blobs.len() * row, "output of the wrong size");
    let mut failed: Vec<(usize, String)> = out
        .par_chunks_exact_mut(row)
        .zip(blobs.par_iter())
        .enumerate()
        .map_init(Resizer::new, |resizer, (i, (dst, bytes))| {
            decode_one(resizer, bytes, size, channels, dst)
                .err()
                .map(|e| (i, e))
        })
        .flatten()
        .collect();
    failed.sort();
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, RgbImage};
    use std::io::Cursor;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn same_size_png_is_exact_and_grey_is_601_luma() {
        let mut rgb = vec![0u8; 2 * 2 * 3];
        assert!(decode_into(&[&png(2, 2)], 2, 3, &mut rgb).is_empty());
        assert_eq!(&rgb[..6], &[0, 0, 0, 7, 0, 3]);
        let mut grey = vec![0u8; 4];
        assert!(decode_into(&[&png(2, 2)], 2, 1, &mut grey).is_empty());
        assert_eq!(grey[1], ((7 * 19595 + 3 * 7471 + 0x8000) >> 16) as u8);
    }

    #[test]
    fn resized_dims_keep_the_shorter_side_and_round_half_up() {
        assert_eq!(resized_dims(30, 20, 10), (15, 10));
        assert_eq!(resized_dims(20, 30, 10), (10, 15));
        assert_eq!(resized_dims(33, 20, 10), (17, 10)); // 16.5 -> 17
        assert_eq!(resized_dims(8, 8, 16), (16, 16));
    }

    #[test]
    fn a_bad_image_is_reported_by_index_and_the_rest_decode() {
        let good = png(2, 2);
        let mut out = vec![0u8; 3 * 2 * 2 * 3];
        let failed = decode_into(&[&good, b"not an image", &good], 2, 3, &mut out);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, 1);
        assert_eq!(out[..12], out[24..]);
    }
}
