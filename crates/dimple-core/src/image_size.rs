//! The image-size rule of the reference processor (`smart_resize`): which size an image is
//! resized to, and how many LLM image tokens it becomes.
//!
//! The router counts image tokens from the header alone and the worker resizes the decoded
//! pixels; both go through this module so the two can never disagree.
//!
//! The arithmetic mirrors the Python reference exactly: every intermediate is an `f64`, and
//! the first rounding is Python's `round`, which breaks ties to even (70 / 28 = 2.5 rounds
//! to 2, where `f64::round` would give 3).

use serde::{Deserialize, Serialize};

/// Largest `long side / short side` ratio the reference accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Errors from the image-size rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageSizeError {
    #[error("image is {width}x{height} (width x height): both sides must be at least {min} pixels")]
    SideTooSmall { height: u32, width: u32, min: u32 },
    #[error(
        "image is {width}x{height} (width x height): aspect ratio {ratio:.3} is above the limit of {max}"
    )]
    AspectRatioTooLarge {
        height: u32,
        width: u32,
        ratio: f64,
        max: f64,
    },
    #[error(
        "image is {width}x{height} (width x height): it resizes to {resized_width}x{resized_height} under `max_pixels` = {max_pixels}, which leaves no patch"
    )]
    EmptyTarget {
        height: u32,
        width: u32,
        resized_height: u64,
        resized_width: u64,
        max_pixels: u64,
    },
    #[error(
        "image is {width}x{height} (width x height): the resized side {side} does not fit in u32"
    )]
    TargetTooLarge { height: u32, width: u32, side: u64 },
    #[error("`{field}` must be at least 1, got 0")]
    ZeroParam { field: &'static str },
    #[error("`patch_size` ({patch_size}) x `merge_size` ({merge_size}) does not fit in u32")]
    FactorOverflow { patch_size: u32, merge_size: u32 },
}

/// The processor parameters that decide the resized size and the token count.
///
/// Field names follow the Hugging Face `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageSizeParams {
    /// Side of one vision patch in pixels.
    pub patch_size: u32,
    /// Patches merged per side into one LLM token (2 means 2x2 patches per token).
    pub merge_size: u32,
    /// Frames per patch; a still image is repeated this many times. Does not change the
    /// token count of an image, but belongs to the same processor configuration.
    pub temporal_patch_size: u32,
    /// Images with fewer pixels than this (after rounding) are scaled up.
    pub min_pixels: u64,
    /// Images with more pixels than this (after rounding) are scaled down.
    pub max_pixels: u64,
}

impl Default for ImageSizeParams {
    fn default() -> Self {
        Self {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 3136,
            max_pixels: 1_003_520,
        }
    }
}

impl ImageSizeParams {
    /// Side length every resized dimension is a multiple of: `patch_size * merge_size`.
    pub fn factor(&self) -> Result<u32, ImageSizeError> {
        self.check()?;
        self.patch_size
            .checked_mul(self.merge_size)
            .ok_or(ImageSizeError::FactorOverflow {
                patch_size: self.patch_size,
                merge_size: self.merge_size,
            })
    }

    fn check(&self) -> Result<(), ImageSizeError> {
        for (field, value) in [
            ("patch_size", self.patch_size),
            ("merge_size", self.merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
        ] {
            if value == 0 {
                return Err(ImageSizeError::ZeroParam { field });
            }
        }
        Ok(())
    }
}

/// Target `(height, width)` of the reference `smart_resize`: both multiples of `factor`,
/// as close to the input as rounding allows, and scaled so the pixel count lies within
/// `[min_pixels, max_pixels]` (only one bound is enforced, as in the reference).
///
/// Rejects a side shorter than `factor` and an aspect ratio above [`MAX_ASPECT_RATIO`].
/// The reference would go on with a zero-sized target when an extreme aspect ratio meets a
/// tiny `max_pixels`; that is rejected here as [`ImageSizeError::EmptyTarget`].
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), ImageSizeError> {
    if factor == 0 {
        return Err(ImageSizeError::ZeroParam { field: "factor" });
    }
    if height < factor || width < factor {
        return Err(ImageSizeError::SideTooSmall {
            height,
            width,
            min: factor,
        });
    }
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageSizeError::AspectRatioTooLarge {
            height,
            width,
            ratio,
            max: MAX_ASPECT_RATIO,
        });
    }

    // The quotients are positive and far below 2^53, so the float-to-integer casts are exact.
    let f_int = u64::from(factor);
    let mut h_bar = (h / f).round_ties_even() as u64 * f_int;
    let mut w_bar = (w / f).round_ties_even() as u64 * f_int;
    // u64 holds the product: both sides are below 2^33 after rounding.
    let hw = f64::from(height) * f64::from(width);
    if h_bar * w_bar > max_pixels {
        let beta = (hw / max_pixels as f64).sqrt();
        h_bar = (h / beta / f).floor() as u64 * f_int;
        w_bar = (w / beta / f).floor() as u64 * f_int;
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / hw).sqrt();
        h_bar = (h * beta / f).ceil() as u64 * f_int;
        w_bar = (w * beta / f).ceil() as u64 * f_int;
    }

    if h_bar == 0 || w_bar == 0 {
        return Err(ImageSizeError::EmptyTarget {
            height,
            width,
            resized_height: h_bar,
            resized_width: w_bar,
            max_pixels,
        });
    }
    let to_u32 = |side: u64| {
        u32::try_from(side).map_err(|_| ImageSizeError::TargetTooLarge {
            height,
            width,
            side,
        })
    };
    Ok((to_u32(h_bar)?, to_u32(w_bar)?))
}

/// Target `(height, width)` for an image under `params` (factor = patch * merge).
pub fn resized_size(
    height: u32,
    width: u32,
    params: &ImageSizeParams,
) -> Result<(u32, u32), ImageSizeError> {
    let factor = params.factor()?;
    smart_resize(height, width, factor, params.min_pixels, params.max_pixels)
}

/// Number of LLM image tokens an image of `height x width` pixels becomes:
/// `(h' / patch) * (w' / patch) / merge^2` with `(h', w')` from [`smart_resize`].
pub fn image_token_count(
    height: u32,
    width: u32,
    params: &ImageSizeParams,
) -> Result<usize, ImageSizeError> {
    let (h, w) = resized_size(height, width, params)?;
    let grid_h = (h / params.patch_size) as usize;
    let grid_w = (w / params.patch_size) as usize;
    let merge = params.merge_size as usize;
    Ok(grid_h * grid_w / (merge * merge))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 3136;
    const MAX: u64 = 1_003_520;

    #[test]
    fn ties_round_to_even_like_python() {
        // image3 is 70 high, 126 wide: 70/28 = 2.5 -> 2 and 126/28 = 4.5 -> 4.
        assert_eq!(smart_resize(70, 126, 28, MIN, MAX), Ok((56, 112)));
        // 3.5 rounds up to 4 (the even neighbour).
        assert_eq!(smart_resize(98, 98, 28, MIN, MAX), Ok((112, 112)));
    }

    #[test]
    fn golden_table_default() {
        // README section A, `default` row: image1 80x100, image2 131x257, image3 70x126.
        assert_eq!(smart_resize(80, 100, 28, MIN, MAX), Ok((84, 112)));
        assert_eq!(smart_resize(131, 257, 28, MIN, MAX), Ok((140, 252)));
        assert_eq!(smart_resize(70, 126, 28, MIN, MAX), Ok((56, 112)));
        let p = ImageSizeParams::default();
        assert_eq!(image_token_count(80, 100, &p), Ok(12));
        assert_eq!(image_token_count(131, 257, &p), Ok(45));
        assert_eq!(image_token_count(70, 126, &p), Ok(8));
    }

    #[test]
    fn golden_table_small_max_scales_down() {
        let p = ImageSizeParams {
            max_pixels: 6272,
            ..Default::default()
        };
        assert_eq!(smart_resize(80, 100, 28, MIN, 6272), Ok((56, 84)));
        assert_eq!(smart_resize(131, 257, 28, MIN, 6272), Ok((56, 84)));
        // 56x112 = 6272 is not above max_pixels, so image3 keeps its rounded size.
        assert_eq!(smart_resize(70, 126, 28, MIN, 6272), Ok((56, 112)));
        assert_eq!(image_token_count(80, 100, &p), Ok(6));
        assert_eq!(image_token_count(131, 257, &p), Ok(6));
        assert_eq!(image_token_count(70, 126, &p), Ok(8));
    }

    #[test]
    fn golden_table_large_min_scales_up() {
        let p = ImageSizeParams {
            min_pixels: 14400,
            ..Default::default()
        };
        assert_eq!(smart_resize(80, 100, 28, 14400, MAX), Ok((112, 140)));
        assert_eq!(smart_resize(70, 126, 28, 14400, MAX), Ok((112, 168)));
        assert_eq!(image_token_count(80, 100, &p), Ok(20));
        assert_eq!(image_token_count(70, 126, &p), Ok(24));
    }

    #[test]
    fn exact_multiples_are_kept() {
        assert_eq!(smart_resize(28, 28, 28, 0, MAX), Ok((28, 28)));
        assert_eq!(smart_resize(224, 448, 28, MIN, MAX), Ok((224, 448)));
    }

    #[test]
    fn down_scaling_stays_within_max_pixels() {
        // 3000x4000: rounding gives 2996x4004 > max_pixels, so beta = sqrt(12e6 / 1003520).
        let (h, w) = smart_resize(3000, 4000, 28, MIN, MAX).unwrap();
        // By hand: beta = 3.45801...; 3000/beta/28 = 30.98 -> 30; 4000/beta/28 = 41.31 -> 41.
        assert_eq!((h, w), (840, 1148));
        assert!(u64::from(h) * u64::from(w) <= MAX);
    }

    #[test]
    fn rejects_short_side() {
        let err = smart_resize(27, 100, 28, MIN, MAX).unwrap_err();
        assert_eq!(
            err,
            ImageSizeError::SideTooSmall {
                height: 27,
                width: 100,
                min: 28
            }
        );
        assert!(err.to_string().contains("at least 28"));
        assert!(matches!(
            smart_resize(100, 27, 28, MIN, MAX),
            Err(ImageSizeError::SideTooSmall { .. })
        ));
    }

    #[test]
    fn rejects_extreme_aspect_ratio() {
        // 5600 / 28 = 200 exactly is allowed; 5601 / 28 is not.
        assert!(smart_resize(28, 5600, 28, MIN, MAX).is_ok());
        let err = smart_resize(28, 5601, 28, MIN, MAX).unwrap_err();
        assert!(matches!(err, ImageSizeError::AspectRatioTooLarge { max, .. } if max == 200.0));
        assert!(err.to_string().contains("200"));
        assert!(matches!(
            smart_resize(5601, 28, 28, MIN, MAX),
            Err(ImageSizeError::AspectRatioTooLarge { .. })
        ));
    }

    #[test]
    fn rejects_a_target_without_patches() {
        // 28x5600 with max_pixels 6272: beta = 5, 28/5/28 = 0.2 floors to 0.
        assert!(matches!(
            smart_resize(28, 5600, 28, MIN, 6272),
            Err(ImageSizeError::EmptyTarget {
                resized_height: 0,
                ..
            })
        ));
    }

    #[test]
    fn rejects_zero_params() {
        let p = ImageSizeParams {
            merge_size: 0,
            ..Default::default()
        };
        assert_eq!(
            image_token_count(100, 100, &p),
            Err(ImageSizeError::ZeroParam {
                field: "merge_size"
            })
        );
        assert_eq!(
            smart_resize(100, 100, 0, MIN, MAX),
            Err(ImageSizeError::ZeroParam { field: "factor" })
        );
    }
}
