//! Image bytes to vision patches, as the reference `DimpleImageProcessor` does it.
//!
//! Steps, each matching the Python reference (transformers 4.46 + Pillow 11):
//! 1. Read the header and refuse images above [`PreprocessConfig::max_decoded_pixels`]
//!    before anything is decoded (decompression bombs).
//! 2. Decode and convert to 8-bit RGB the way `PIL.Image.convert("RGB")` does: alpha is
//!    dropped, not composited; 16-bit samples keep their high byte as Pillow's PNG reader
//!    does, except 16-bit grey, which Pillow clips to 255.
//! 3. Target size from [`dimple_core::image_size::smart_resize`] (the single source of truth
//!    the router also uses to count tokens).
//! 4. [`resize_rgb_bicubic`]: a re-implementation of Pillow's `Image.resize(..., BICUBIC)`
//!    on `uint8` (fixed-point, two passes), bit for bit.
//! 5. Rescale (`u8 as f64 * rescale_factor`, then `f32`) and normalise in `f32`.
//! 6. Repeat the frame `temporal_patch_size` times and cut patches in the reference order.
//!
//! Only the decoders differ from the reference: PNG (checked against the golden files) and
//! BMP are lossless and give Pillow's pixels. JPEG and lossy WebP use other decoders than
//! Pillow's libjpeg-turbo and libwebp, whose IDCT and chroma upsampling may differ by a unit
//! here and there; GIF transparency and partial first frames may be filled differently.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use dimple_core::image_size::{ImageSizeError, ImageSizeParams, resized_size};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::Deserialize;

use crate::ModelError;

/// Default cap on `width * height` of an input before it is decoded (50 megapixels, about
/// 150 MB as RGB).
pub const DEFAULT_MAX_DECODED_PIXELS: u64 = 50_000_000;

/// Pillow's `Image.Resampling.BICUBIC`, the only `resample` value supported.
const PIL_BICUBIC: u32 = 3;

/// Largest bytes per decoded pixel among the enabled formats (16-bit RGBA).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Slack for decoder buffers other than the output image (palettes, rows, metadata).
const DECODER_ALLOC_SLACK: u64 = 64 << 20;

/// Errors from reading the preprocessor config and from preprocessing an image.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read preprocessor config {path}: {source}")]
    ConfigIo {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse preprocessor config: {0}")]
    ConfigParse(#[from] serde_json::Error),
    #[error("invalid preprocessor config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(
        "image format not recognised from its first bytes (supported: png, jpeg, webp, gif, bmp)"
    )]
    UnknownFormat,
    #[error("cannot read the image header: {0}")]
    Header(String),
    #[error("image is {width}x{height} = {pixels} pixels, above `max_decoded_pixels` = {max}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    #[error("cannot decode the image: {0}")]
    Decode(String),
    #[error("image size: {0}")]
    Size(#[from] ImageSizeError),
    #[error(
        "cannot stack images with different patch sizes: image {index} has `patch_dim` {got}, expected {expected}"
    )]
    PatchDimMismatch {
        index: usize,
        got: usize,
        expected: usize,
    },
}

impl From<PreprocessError> for ModelError {
    fn from(e: PreprocessError) -> Self {
        match e {
            PreprocessError::ConfigIo { .. } => ModelError::Io(e.to_string()),
            PreprocessError::ConfigParse(_) | PreprocessError::InvalidConfig { .. } => {
                ModelError::Config(e.to_string())
            }
            _ => ModelError::Image(e.to_string()),
        }
    }
}

/// Image preprocessing parameters, read from a Hugging Face `preprocessor_config.json`.
///
/// Missing fields take the reference defaults (OpenAI CLIP mean and std, 14-pixel patches,
/// 2 frames, 2x2 merge, 3136..=1003520 pixels). `max_decoded_pixels` is not part of the
/// HF file: it bounds the work done on untrusted input.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawPreprocessConfig")]
pub struct PreprocessConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub merge_size: u32,
    /// Per-channel (RGB) mean, subtracted after rescaling. Kept in `f64` as parsed; cast to
    /// `f32` when used, as numpy does.
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub rescale_factor: f64,
    /// Inputs whose header claims more than `width * height` pixels are refused undecoded.
    pub max_decoded_pixels: u64,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        let size = ImageSizeParams::default();
        Self {
            min_pixels: size.min_pixels,
            max_pixels: size.max_pixels,
            patch_size: size.patch_size,
            temporal_patch_size: size.temporal_patch_size,
            merge_size: size.merge_size,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            rescale_factor: 1.0 / 255.0,
            max_decoded_pixels: DEFAULT_MAX_DECODED_PIXELS,
        }
    }
}

impl PreprocessConfig {
    /// Reads and validates a `preprocessor_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PreprocessError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PreprocessError::ConfigIo {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates the JSON text of a `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self, PreprocessError> {
        // Going through the raw form keeps a failed check as `InvalidConfig` instead of a
        // serde message.
        let raw: RawPreprocessConfig = serde_json::from_str(text)?;
        raw.try_into()
    }

    /// The parameters of the size rule shared with the router.
    pub fn size_params(&self) -> ImageSizeParams {
        ImageSizeParams {
            patch_size: self.patch_size,
            merge_size: self.merge_size,
            temporal_patch_size: self.temporal_patch_size,
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
        }
    }

    /// Values per patch row: `3 * temporal_patch_size * patch_size^2` (1176 by default).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size as usize * (self.patch_size as usize).pow(2)
    }

    /// Checks the values the pipeline relies on. Called by [`preprocess_image`] as well,
    /// since the fields are public.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |field, reason: String| Err(PreprocessError::InvalidConfig { field, reason });
        // Upper bounds far above any vision model; they keep the index arithmetic small.
        for (field, value, max) in [
            ("patch_size", self.patch_size, 1024),
            ("temporal_patch_size", self.temporal_patch_size, 64),
            ("merge_size", self.merge_size, 64),
        ] {
            if !(1..=max).contains(&value) {
                return invalid(field, format!("must be in [1, {max}], got {value}"));
            }
        }
        if self.min_pixels > self.max_pixels {
            return invalid(
                "min_pixels",
                format!(
                    "({}) must not exceed `max_pixels` ({})",
                    self.min_pixels, self.max_pixels
                ),
            );
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return invalid(
                "rescale_factor",
                format!("must be finite and > 0, got {}", self.rescale_factor),
            );
        }
        if let Some(m) = self.image_mean.iter().find(|m| !m.is_finite()) {
            return invalid("image_mean", format!("must be finite, got {m}"));
        }
        if let Some(s) = self
            .image_std
            .iter()
            .find(|s| !(s.is_finite() && **s != 0.0))
        {
            return invalid("image_std", format!("must be finite and non-zero, got {s}"));
        }
        if self.max_decoded_pixels == 0 {
            return invalid("max_decoded_pixels", "must be at least 1, got 0".into());
        }
        Ok(())
    }
}

/// The file as written by `save_pretrained`, before defaults and checks.
#[derive(Deserialize)]
struct RawPreprocessConfig {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    /// Newer processors also (or only) write the bounds here; top-level keys win, as in
    /// transformers.
    size: Option<RawSize>,
    patch_size: Option<u32>,
    temporal_patch_size: Option<u32>,
    merge_size: Option<u32>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
    rescale_factor: Option<f64>,
    max_decoded_pixels: Option<u64>,
    // Steps of the reference that this implementation always runs: a file that turns one
    // off, or picks another filter, is refused rather than silently preprocessed differently.
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
    resample: Option<u32>,
}

#[derive(Deserialize)]
struct RawSize {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

impl TryFrom<RawPreprocessConfig> for PreprocessConfig {
    type Error = PreprocessError;

    fn try_from(raw: RawPreprocessConfig) -> Result<Self, Self::Error> {
        for (field, flag) in [
            ("do_resize", raw.do_resize),
            ("do_rescale", raw.do_rescale),
            ("do_normalize", raw.do_normalize),
            ("do_convert_rgb", raw.do_convert_rgb),
        ] {
            if flag == Some(false) {
                return Err(PreprocessError::InvalidConfig {
                    field,
                    reason: "= false is not supported (the step always runs)".into(),
                });
            }
        }
        if let Some(r) = raw.resample.filter(|r| *r != PIL_BICUBIC) {
            return Err(PreprocessError::InvalidConfig {
                field: "resample",
                reason: format!("must be {PIL_BICUBIC} (BICUBIC), got {r}"),
            });
        }
        let d = Self::default();
        let size_min = raw
            .size
            .as_ref()
            .and_then(|s| s.min_pixels.or(s.shortest_edge));
        let size_max = raw
            .size
            .as_ref()
            .and_then(|s| s.max_pixels.or(s.longest_edge));
        let cfg = Self {
            min_pixels: raw.min_pixels.or(size_min).unwrap_or(d.min_pixels),
            max_pixels: raw.max_pixels.or(size_max).unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            image_mean: raw.image_mean.unwrap_or(d.image_mean),
            image_std: raw.image_std.unwrap_or(d.image_std),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            max_decoded_pixels: raw.max_decoded_pixels.unwrap_or(d.max_decoded_pixels),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedImage {
    /// Row-major `[n_patches, patch_dim]`. Rows come in `merge x merge` groups (row-major
    /// over groups); each row is ordered channel, frame, y, x.
    pub pixel_values: Vec<f32>,
    pub n_patches: usize,
    pub patch_dim: usize,
    /// `[frames / temporal_patch_size, resized_height / patch, resized_width / patch]`.
    pub grid_thw: [usize; 3],
    pub resized_width: u32,
    pub resized_height: u32,
}

impl PreprocessedImage {
    /// LLM tokens this image becomes: `t * h * w / merge_size^2`.
    pub fn num_image_tokens(&self, merge_size: usize) -> usize {
        let [t, h, w] = self.grid_thw;
        t * h * w / (merge_size * merge_size).max(1)
    }

    /// `[n_patches, patch_dim]` f32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.pixel_values, (self.n_patches, self.patch_dim), device)
    }
}

/// Several images of one request, rows concatenated in image order (as the reference
/// processor returns them).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    /// Row-major `[n_patches, patch_dim]`, image after image.
    pub pixel_values: Vec<f32>,
    pub n_patches: usize,
    pub patch_dim: usize,
    /// One `[t, h, w]` per image, in order.
    pub grid_thw: Vec<[usize; 3]>,
}

impl ImageBatch {
    /// `[n_patches, patch_dim]` f32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.pixel_values, (self.n_patches, self.patch_dim), device)
    }
}

/// Stacks the rows of several images in order. All must share `patch_dim`; an empty slice
/// gives an empty batch with `patch_dim` 0.
pub fn concat_images(images: &[PreprocessedImage]) -> Result<ImageBatch, PreprocessError> {
    let patch_dim = images.first().map_or(0, |im| im.patch_dim);
    let n_patches = images.iter().map(|im| im.n_patches).sum();
    let mut pixel_values = Vec::with_capacity(n_patches * patch_dim);
    for (index, im) in images.iter().enumerate() {
        if im.patch_dim != patch_dim {
            return Err(PreprocessError::PatchDimMismatch {
                index,
                got: im.patch_dim,
                expected: patch_dim,
            });
        }
        pixel_values.extend_from_slice(&im.pixel_values);
    }
    Ok(ImageBatch {
        pixel_values,
        n_patches,
        patch_dim,
        grid_thw: images.iter().map(|im| im.grid_thw).collect(),
    })
}

/// Full pipeline: encoded bytes (format guessed from the content) to patches.
pub fn preprocess_image(
    bytes: &[u8],
    cfg: &PreprocessConfig,
) -> Result<PreprocessedImage, PreprocessError> {
    cfg.validate()?;
    let rgb = decode_rgb8(bytes, cfg.max_decoded_pixels)?;
    preprocess_rgb(&rgb, cfg)
}

/// Reads `(width, height)` from the header only, without decoding pixels.
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), PreprocessError> {
    let reader = guessed_reader(bytes, Limits::default())?;
    let decoder = reader
        .into_decoder()
        .map_err(|e| PreprocessError::Header(e.to_string()))?;
    Ok(decoder.dimensions())
}

fn guessed_reader(
    bytes: &[u8],
    limits: Limits,
) -> Result<ImageReader<Cursor<&[u8]>>, PreprocessError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Header(e.to_string()))?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnknownFormat);
    }
    reader.limits(limits);
    Ok(reader)
}

/// Decodes to 8-bit RGB after checking the header against `max_pixels`.
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    let max_alloc = max_pixels
        .saturating_mul(MAX_BYTES_PER_PIXEL)
        .saturating_add(DECODER_ALLOC_SLACK);
    // Width and height are left unbounded here so that an oversized header reaches the
    // explicit pixel check below, which reports both sides; `max_alloc` bounds the header
    // parsing and the decoder's buffers.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    let decoder = guessed_reader(bytes, limits)?
        .into_decoder()
        .map_err(|e| PreprocessError::Header(e.to_string()))?;

    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            pixels,
            max: max_pixels,
        });
    }
    if decoder.total_bytes() > max_alloc {
        return Err(PreprocessError::Decode(format!(
            "the decoded image needs {} bytes, above the {max_alloc}-byte allocation limit",
            decoder.total_bytes()
        )));
    }
    let image =
        DynamicImage::from_decoder(decoder).map_err(|e| PreprocessError::Decode(e.to_string()))?;
    Ok(to_rgb8_like_pil(image))
}

/// `PIL.Image.convert("RGB")` on what Pillow would have opened.
fn to_rgb8_like_pil(image: DynamicImage) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let from_fn =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match &image {
        DynamicImage::ImageRgb8(_) => {}
        // Pillow drops alpha on RGBA/LA -> RGB, it does not composite over a background.
        DynamicImage::ImageRgba8(im) => {
            return from_fn(&|x, y| {
                let [r, g, b, _] = im.get_pixel(x, y).0;
                [r, g, b]
            });
        }
        DynamicImage::ImageLuma8(im) => {
            return from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]);
        }
        DynamicImage::ImageLumaA8(im) => {
            return from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]);
        }
        // Pillow opens 16-bit grey PNG as mode "I;16", and I;16 -> RGB clips at 255
        // instead of scaling.
        DynamicImage::ImageLuma16(im) => {
            return from_fn(&|x, y| [im.get_pixel(x, y).0[0].min(255) as u8; 3]);
        }
        // Pillow reads 16-bit LA/RGB/RGBA PNG samples with the ";16B" raw modes, which keep
        // the most significant byte.
        DynamicImage::ImageLumaA16(im) => {
            return from_fn(&|x, y| [(im.get_pixel(x, y).0[0] >> 8) as u8; 3]);
        }
        DynamicImage::ImageRgb16(im) => {
            return from_fn(&|x, y| im.get_pixel(x, y).0.map(|v| (v >> 8) as u8));
        }
        DynamicImage::ImageRgba16(im) => {
            return from_fn(&|x, y| {
                let [r, g, b, _] = im.get_pixel(x, y).0;
                [r, g, b].map(|v| (v >> 8) as u8)
            });
        }
        _ => {}
    }
    image.into_rgb8()
}

/// Steps 3 to 6 on an already decoded RGB image.
pub fn preprocess_rgb(
    image: &RgbImage,
    cfg: &PreprocessConfig,
) -> Result<PreprocessedImage, PreprocessError> {
    cfg.validate()?;
    let (height, width) = resized_size(image.height(), image.width(), &cfg.size_params())?;
    let resized = resize_rgb_bicubic(image, width, height);
    Ok(patchify(&resized, cfg))
}

/// Rescale, normalise, repeat the frame and cut patches. `image` sides must be multiples of
/// `patch_size * merge_size`.
fn patchify(image: &RgbImage, cfg: &PreprocessConfig) -> PreprocessedImage {
    let p = cfg.patch_size as usize;
    let m = cfg.merge_size as usize;
    let frames = cfg.temporal_patch_size as usize;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (grid_h, grid_w) = (h / p, w / p);
    let patch_dim = cfg.patch_dim();
    let n_patches = grid_h * grid_w;

    // Every u8 maps to one f32 per channel; computing the 256 values once gives the same
    // bits as the per-pixel numpy expression `((x as f64 * scale) as f32 - mean) / std`.
    let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
        let mean = cfg.image_mean[c] as f32;
        let std = cfg.image_std[c] as f32;
        std::array::from_fn(|v| ((v as f64 * cfg.rescale_factor) as f32 - mean) / std)
    });

    let raw = image.as_raw();
    let mut out = Vec::with_capacity(n_patches * patch_dim);
    for block_y in 0..grid_h / m {
        for block_x in 0..grid_w / m {
            for merge_y in 0..m {
                for merge_x in 0..m {
                    let y0 = (block_y * m + merge_y) * p;
                    let x0 = (block_x * m + merge_x) * p;
                    for (c, lut_c) in lut.iter().enumerate() {
                        // The frames are copies of the one still image.
                        for _ in 0..frames {
                            for y in y0..y0 + p {
                                let row = &raw[(y * w + x0) * 3..(y * w + x0 + p) * 3];
                                out.extend(row.chunks_exact(3).map(|px| lut_c[px[c] as usize]));
                            }
                        }
                    }
                }
            }
        }
    }
    PreprocessedImage {
        pixel_values: out,
        n_patches,
        patch_dim,
        grid_thw: [1, grid_h, grid_w],
        resized_width: image.width(),
        resized_height: image.height(),
    }
}

// ---------------------------------------------------------------------------------------
// Pillow's BICUBIC resample on 8-bit images.
//
// Pillow computes, for every output column (then row), the input span and the filter
// weights in f64, normalises them to sum 1, turns them into fixed point with 22 fraction
// bits, and accumulates u8 * weight in i32 starting from one half; the result is shifted
// back and clipped to u8. The horizontal pass writes u8, which the vertical pass reads, so
// there is a rounding between the passes. A pass whose size does not change is skipped.
// ---------------------------------------------------------------------------------------

/// Fraction bits of Pillow's fixed-point weights: 32 bits minus 8 for the sample and 2 for
/// the overshoot of the negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic support (in input pixels at scale 1).
const BICUBIC_SUPPORT: f64 = 2.0;

/// The cubic convolution kernel with a = -0.5, written in Pillow's operation order so the
/// f64 results agree.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights for one axis.
struct AxisWeights {
    /// Weights per output position (`ksize` slots, the first `len` used).
    ksize: usize,
    /// Per output position: first input index and number of inputs.
    spans: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn axis_weights(in_size: u32, out_size: u32) -> AxisWeights {
    // Pillow takes the box as C floats: the extent goes through f32 first.
    let scale = f64::from(in_size as f32) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    // support <= 2 * in_size, so this is a small positive integer.
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let one = f64::from(1u32 << PRECISION_BITS);

    let out_len = out_size as usize;
    let mut spans = Vec::with_capacity(out_len);
    let mut weights = vec![0i32; out_len * ksize];
    let mut k = vec![0f64; ksize];
    for (xx, wrow) in weights.chunks_exact_mut(ksize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // `as i64` truncates toward zero like C's (int) cast; negatives clamp to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let len = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;

        let mut total = 0.0;
        for (x, kx) in k[..len].iter_mut().enumerate() {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            total += w;
        }
        for (kx, wx) in k[..len].iter().zip(wrow.iter_mut()) {
            let kx = if total != 0.0 { kx / total } else { *kx };
            // Round half away from zero, then truncate, as Pillow's normalize_coeffs_8bpc.
            *wx = if kx < 0.0 {
                (-0.5 + kx * one) as i32
            } else {
                (0.5 + kx * one) as i32
            };
        }
        spans.push((xmin, len));
    }
    AxisWeights {
        ksize,
        spans,
        weights,
    }
}

/// Convolves one channel-interleaved run of samples (`stride` apart) with fixed weights.
#[inline]
fn fixed_dot(samples: impl Iterator<Item = u8>, weights: &[i32]) -> u8 {
    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
    for (s, w) in samples.zip(weights) {
        // Wrapping mirrors Pillow's int arithmetic; with normalised weights the sum stays
        // far from overflow (|sum| < 255 * 1.5 * 2^22 < 2^31).
        acc = acc.wrapping_add(i32::from(s).wrapping_mul(*w));
    }
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image,
/// bit for bit (no `reducing_gap`, full-image box).
pub fn resize_rgb_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = image.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;

    let vert = axis_weights(in_h, height);
    // Only the input rows the vertical pass reads go through the horizontal pass.
    let row_first = vert.spans.first().map_or(0, |s| s.0);
    let row_last = vert.spans.last().map_or(0, |s| s.0 + s.1);

    let horizontal;
    let (src, src_w, row_offset): (&[u8], usize, usize) = if need_horizontal {
        let horiz = axis_weights(in_w, width);
        let out_w = width as usize;
        let src = image.as_raw();
        let mut buf = vec![0u8; (row_last - row_first) * out_w * 3];
        for (r, out_row) in buf.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &src[(row_first + r) * in_w as usize * 3..][..in_w as usize * 3];
            for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
                let (xmin, len) = horiz.spans[xx];
                let k = &horiz.weights[xx * horiz.ksize..][..len];
                let span = &in_row[xmin * 3..(xmin + len) * 3];
                for (c, o) in out_px.iter_mut().enumerate() {
                    *o = fixed_dot(span.iter().skip(c).step_by(3).copied(), k);
                }
            }
        }
        horizontal = buf;
        (&horizontal, out_w, row_first)
    } else {
        (image.as_raw(), in_w as usize, 0)
    };

    if !need_vertical {
        // Either the horizontal result (which covers every row, since the vertical span is
        // the identity) or an unchanged copy.
        let data = src[..src_w * 3 * height as usize].to_vec();
        // Infallible: `data` holds exactly width * height * 3 bytes.
        return RgbImage::from_raw(src_w as u32, height, data).expect("buffer matches its size");
    }

    let row_bytes = src_w * 3;
    let mut out = vec![0u8; height as usize * row_bytes];
    for (yy, out_row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (ymin, len) = vert.spans[yy];
        let ymin = ymin - row_offset;
        let k = &vert.weights[yy * vert.ksize..][..len];
        for (i, o) in out_row.iter_mut().enumerate() {
            *o = fixed_dot((0..len).map(|y| src[(ymin + y) * row_bytes + i]), k);
        }
    }
    // Infallible: `out` holds exactly width * height * 3 bytes by construction.
    RgbImage::from_raw(src_w as u32, height, out).expect("buffer matches its size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        // a = -0.5 at x = 0.5: (1.5 * 0.5 - 2.5) * 0.25 + 1 = 0.5625.
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
    }

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::from_fn(30, 29, |x, y| {
            image::Rgb([x as u8 * 7, y as u8 * 5, (x ^ y) as u8])
        });
        assert_eq!(resize_rgb_bicubic(&img, 30, 29), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 53, image::Rgb([200, 13, 255]));
        let out = resize_rgb_bicubic(&img, 112, 28);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 255]));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100u32, 112u32), (257, 84), (70, 56), (5, 1)] {
            let w = axis_weights(i, o);
            for (xx, (_, len)) in w.spans.iter().enumerate() {
                let sum: i64 = w.weights[xx * w.ksize..][..*len]
                    .iter()
                    .map(|&v| i64::from(v))
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= *len as i64,
                    "{i}->{o} at {xx}: {sum}"
                );
            }
        }
    }
}
