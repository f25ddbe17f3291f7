//! Image preprocessing against the golden outputs of the reference processor
//! (transformers `DimpleImageProcessor` + Pillow 11), plus the refusal paths.

use std::io::Cursor;

use candle_core::Device;
use dimple_core::image_size::{ImageSizeError, image_token_count};
use dimple_model::preprocess::{
    PreprocessConfig, PreprocessError, PreprocessedImage, concat_images, image_dimensions,
    preprocess_image, resize_rgb_bicubic,
};
use image::{ImageFormat, RgbImage};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{GOLDEN}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn preproc_json() -> Value {
    serde_json::from_slice(&read("preproc.json")).unwrap()
}

fn decode_png(name: &str) -> RgbImage {
    image::load_from_memory_with_format(&read(name), ImageFormat::Png)
        .unwrap()
        .into_rgb8()
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn as_usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The variant's processor parameters, parsed by our own HF config reader.
fn variant_config(variant: &Value) -> PreprocessConfig {
    PreprocessConfig::from_json(&variant["processor_params"].to_string()).unwrap()
}

fn check_variant(name: &str, expected_images: &[&str]) {
    let all = preproc_json();
    let variant = &all["variants"][name];
    let cfg = variant_config(variant);
    let images = variant["images"].as_object().unwrap();
    let mut keys: Vec<&str> = images.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, expected_images, "{name}: images covered");

    let st_bytes = read(&format!("preproc_{name}.safetensors"));
    let st = SafeTensors::deserialize(&st_bytes).unwrap();

    for key in expected_images {
        let info = &images[*key];
        let ctx = format!("{name}/{key}");
        let src = read(&format!("{key}.png"));
        let out = preprocess_image(&src, &cfg).unwrap();

        // Size, grid and token count.
        let input_hw = as_usizes(&info["input_size_hw"]);
        let resized_hw = as_usizes(&info["resized_hw"]);
        let grid = as_usizes(&info["image_grid_thw"]);
        let tokens = info["num_merged_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            [out.resized_height as usize, out.resized_width as usize],
            resized_hw[..],
            "{ctx}: resized size"
        );
        assert_eq!(out.grid_thw[..], grid[..], "{ctx}: grid (json)");
        let st_grid = i64s(&st, &format!("{key}.image_grid_thw"));
        assert_eq!(
            out.grid_thw.iter().map(|&g| g as i64).collect::<Vec<_>>(),
            st_grid,
            "{ctx}: grid (safetensors)"
        );
        assert_eq!(
            out.num_image_tokens(cfg.merge_size as usize),
            tokens,
            "{ctx}: tokens"
        );
        // The header-only count the router uses agrees with the full pipeline.
        assert_eq!(
            image_token_count(input_hw[0] as u32, input_hw[1] as u32, &cfg.size_params()),
            Ok(tokens),
            "{ctx}: image_token_count"
        );

        // The resize alone, against Pillow's uint8 output.
        let resized = resize_rgb_bicubic(
            &decode_png(&format!("{key}.png")),
            out.resized_width,
            out.resized_height,
        );
        let want = decode_png(info["resized_png"].as_str().unwrap());
        assert_eq!(
            resized.dimensions(),
            want.dimensions(),
            "{ctx}: resized dims"
        );
        let differing = resized
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "{ctx}: {differing} resized samples differ from Pillow"
        );

        // Patches.
        let (shape, want_pv) = f32s(&st, &format!("{key}.pixel_values"));
        assert_eq!(
            shape,
            [out.n_patches, out.patch_dim],
            "{ctx}: pixel_values shape"
        );
        assert_eq!(
            out.pixel_values.len(),
            want_pv.len(),
            "{ctx}: pixel_values len"
        );
        let max_diff = out
            .pixel_values
            .iter()
            .zip(&want_pv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff <= 1e-6,
            "{ctx}: pixel_values max |diff| = {max_diff}"
        );
        // The arithmetic follows numpy step by step, so the bits agree too.
        let bit_diffs = out
            .pixel_values
            .iter()
            .zip(&want_pv)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            bit_diffs, 0,
            "{ctx}: {bit_diffs} pixel_values differ in their bits"
        );
    }
}

#[test]
fn golden_default() {
    check_variant("default", &["image1", "image2", "image3"]);
}

#[test]
fn golden_small_max() {
    check_variant("small_max", &["image1", "image2", "image3"]);
}

#[test]
fn golden_large_min() {
    check_variant("large_min", &["image1", "image3"]);
}

#[test]
fn several_images_concatenate_rows_in_order() {
    let cfg = PreprocessConfig::default();
    let a = preprocess_image(&read("image1.png"), &cfg).unwrap();
    let b = preprocess_image(&read("image2.png"), &cfg).unwrap();
    let batch = concat_images(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(batch.grid_thw, vec![[1, 6, 8], [1, 10, 18]]);
    assert_eq!(batch.n_patches, 48 + 180);
    assert_eq!(batch.patch_dim, 1176);
    assert_eq!(
        batch.pixel_values[..a.pixel_values.len()],
        a.pixel_values[..]
    );
    assert_eq!(
        batch.pixel_values[a.pixel_values.len()..],
        b.pixel_values[..]
    );
    let t = batch.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(t.dims(), [228, 1176]);

    // Compare the tensor path with the golden rows of image2 (the second block).
    let st_bytes = read("preproc_default.safetensors");
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let (_, want) = f32s(&st, "image2.pixel_values");
    let rows: Vec<Vec<f32>> = t.narrow(0, 48, 180).unwrap().to_vec2().unwrap();
    assert_eq!(rows.concat(), want);

    let single = a.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(single.dims(), [48, 1176]);
}

#[test]
fn concat_rejects_mixed_patch_sizes() {
    let cfg = PreprocessConfig::default();
    let a = preprocess_image(&read("image1.png"), &cfg).unwrap();
    let small = PreprocessConfig {
        patch_size: 7,
        ..cfg
    };
    let b = preprocess_image(&read("image1.png"), &small).unwrap();
    assert_eq!(b.patch_dim, 3 * 2 * 7 * 7);
    let err = concat_images(&[a, b]).unwrap_err();
    assert!(matches!(
        err,
        PreprocessError::PatchDimMismatch {
            index: 1,
            got: 294,
            expected: 1176
        }
    ));
}

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

#[test]
fn config_from_demo_file() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/demo_model/preprocessor_config.json"
    );
    let cfg = PreprocessConfig::from_file(path).unwrap();
    assert_eq!(cfg.min_pixels, 3136);
    assert_eq!(cfg.max_pixels, 1_003_520);
    assert_eq!(
        (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size),
        (14, 2, 2)
    );
    assert_eq!(cfg.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(cfg.image_std, [0.26862954, 0.26130258, 0.27577711]);
    assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
    assert_eq!(cfg.max_decoded_pixels, 50_000_000);
    assert_eq!(cfg.patch_dim(), 1176);
}

#[test]
fn config_defaults_and_size_fallback() {
    let empty = PreprocessConfig::from_json("{}").unwrap();
    assert_eq!(empty.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!((empty.min_pixels, empty.max_pixels), (3136, 1_003_520));
    assert_eq!(empty, PreprocessConfig::default());

    let sized =
        PreprocessConfig::from_json(r#"{"size": {"shortest_edge": 100, "longest_edge": 9000}}"#)
            .unwrap();
    assert_eq!((sized.min_pixels, sized.max_pixels), (100, 9000));
    let top_wins = PreprocessConfig::from_json(
        r#"{"min_pixels": 200, "size": {"min_pixels": 100, "max_pixels": 9000}}"#,
    )
    .unwrap();
    assert_eq!((top_wins.min_pixels, top_wins.max_pixels), (200, 9000));

    let capped = PreprocessConfig::from_json(r#"{"max_decoded_pixels": 1234}"#).unwrap();
    assert_eq!(capped.max_decoded_pixels, 1234);
}

#[test]
fn config_refuses_unsupported_settings() {
    for (json, field) in [
        (r#"{"do_normalize": false}"#, "do_normalize"),
        (r#"{"resample": 2}"#, "resample"),
        (r#"{"patch_size": 0}"#, "patch_size"),
        (r#"{"min_pixels": 10, "max_pixels": 5}"#, "min_pixels"),
        (r#"{"image_std": [1.0, 0.0, 1.0]}"#, "image_std"),
    ] {
        let err = PreprocessConfig::from_json(json).unwrap_err();
        assert!(
            matches!(&err, PreprocessError::InvalidConfig { field: f, .. } if *f == field),
            "{json}: {err}"
        );
        assert!(err.to_string().contains(field), "{json}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn rejects_undecodable_bytes() {
    let cfg = PreprocessConfig::default();
    let err = preprocess_image(b"definitely not an image", &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::UnknownFormat), "{err}");

    // A PNG signature and header whose pixel data is cut off: known format, broken data.
    let full = png_bytes(&RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([x as u8, y as u8, 7])
    }));
    let truncated = &full[..full.len() / 2];
    let err = preprocess_image(truncated, &cfg).unwrap_err();
    assert!(
        matches!(err, PreprocessError::Decode(_) | PreprocessError::Header(_)),
        "{err}"
    );
}

#[test]
fn rejects_short_side() {
    let png = png_bytes(&RgbImage::new(100, 27));
    let err = preprocess_image(&png, &PreprocessConfig::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::Size(ImageSizeError::SideTooSmall {
                height: 27,
                width: 100,
                min: 28
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at least 28"), "{err}");
}

#[test]
fn rejects_extreme_aspect_ratio() {
    // 5657 / 28 = 202.0 > 200.
    let png = png_bytes(&RgbImage::new(5657, 28));
    let err = preprocess_image(&png, &PreprocessConfig::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::Size(ImageSizeError::AspectRatioTooLarge { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("200"), "{err}");
}

/// CRC-32 (IEEE), for patching a PNG chunk.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid small PNG whose IHDR is rewritten to claim `width x height` pixels; the pixel data
/// stays that of the small image, so decoding it would fail.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = png_bytes(&RgbImage::new(4, 4));
    // Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4) + 5 bytes + CRC.
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn rejects_pixel_bomb_from_the_header() {
    let cfg = PreprocessConfig::default();
    let bomb = png_claiming(100_000, 100_000);
    assert_eq!(image_dimensions(&bomb).unwrap(), (100_000, 100_000));
    let err = preprocess_image(&bomb, &cfg).unwrap_err();
    match err {
        PreprocessError::TooManyPixels {
            width,
            height,
            pixels,
            max,
        } => {
            assert_eq!((width, height), (100_000, 100_000));
            assert_eq!(pixels, 10_000_000_000);
            assert_eq!(max, 50_000_000);
        }
        other => panic!("expected TooManyPixels, got {other}"),
    }

    // One pixel over a small cap on a real, decodable image.
    let small_cap = PreprocessConfig {
        max_decoded_pixels: 100 * 100 - 1,
        ..cfg
    };
    let png = png_bytes(&RgbImage::new(100, 100));
    let err = preprocess_image(&png, &small_cap).unwrap_err();
    assert!(matches!(
        err,
        PreprocessError::TooManyPixels {
            pixels: 10_000,
            max: 9_999,
            ..
        }
    ));
    assert!(err.to_string().contains("max_decoded_pixels"), "{err}");
    let at_cap = PreprocessConfig {
        max_decoded_pixels: 100 * 100,
        ..small_cap
    };
    assert!(preprocess_image(&png, &at_cap).is_ok());
}

#[test]
fn alpha_is_dropped_not_composited() {
    // PIL's convert("RGB") drops alpha: a fully transparent red pixel stays red.
    let rgba = image::RgbaImage::from_pixel(56, 56, image::Rgba([255, 0, 0, 0]));
    let mut bytes = Cursor::new(Vec::new());
    rgba.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let out: PreprocessedImage =
        preprocess_image(bytes.get_ref(), &PreprocessConfig::default()).unwrap();
    // Red channel of the first patch, normalised from 255: (1 - mean_r) / std_r, with the
    // JSON (f64) mean and std cast to f32 as numpy does.
    let expected =
        ((255.0f64 * (1.0 / 255.0)) as f32 - 0.48145466f64 as f32) / 0.26862954f64 as f32;
    assert_eq!(out.pixel_values[0], expected);
    // Green channel comes after 2 frames * 14 * 14 red values.
    let g = (0.0f32 - 0.4578275f64 as f32) / 0.26130258f64 as f32;
    assert_eq!(out.pixel_values[2 * 14 * 14], g);
}
