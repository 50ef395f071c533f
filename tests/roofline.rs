//! The sweep's arithmetic (bytes, FLOPs, floors) and its outputs (CSV rows, the SVG and PNG plots).

use braidinfer::config::ModelConfig;
use braidinfer::plot::{roofline_plot, PlotFormat};
use braidinfer::roofline::{step_bytes, step_flops, Point, CSV_HEADER};

#[test]
fn flops_count_every_weight_twice_per_row_plus_attention() {
    let c = ModelConfig::qwen3_0_6b();
    // Qwen3-0.6B: 28 layers of 15.73M product weights, a 151,936 x 1,024 LM head.
    let weights = 28.0 * 15_728_640.0 + 151_936.0 * 1024.0;
    let attention = |context: f64| 28.0 * 16.0 * 128.0 * 4.0 * (context + 1.0);
    assert_eq!(step_flops(&c, 1, 0), 2.0 * weights + attention(0.0));
    assert_eq!(
        step_flops(&c, 3, 511),
        3.0 * (2.0 * weights + attention(511.0))
    );
}

#[test]
fn bytes_are_weights_once_plus_each_sequences_kv() {
    let c = ModelConfig::qwen3_0_6b();
    let kv_per_position = 28.0 * 2.0 * 8.0 * 128.0 * 2.0; // K and V, bf16, every layer
    assert_eq!(step_bytes(&c, 1e9, 1, 100), 1e9 + 102.0 * kv_per_position);
    assert_eq!(
        step_bytes(&c, 1e9, 4, 100),
        1e9 + 4.0 * 102.0 * kv_per_position
    );
}

#[test]
fn a_point_is_measured_against_the_larger_floor() {
    let c = ModelConfig::qwen3_0_6b();
    let p = Point::new(&c, 1.2e9, 1, 512, 1.0, 4e12, 4e14);
    assert!((p.memory_floor_ms - step_bytes(&c, 1.2e9, 1, 512) / 4e12 * 1e3).abs() < 1e-12);
    assert!(
        p.memory_floor_ms > p.compute_floor_ms,
        "batch 1 is memory-bound"
    );
    assert!(
        (p.fraction_of_roofline - p.memory_floor_ms).abs() < 1e-12,
        "1 ms step"
    );
    assert!((p.tokens_per_s - 1000.0).abs() < 1e-9);
    let big = Point::new(&c, 1.2e9, 256, 512, 10.0, 4e12, 4e14);
    assert!(
        (big.fraction_of_roofline - big.memory_floor_ms.max(big.compute_floor_ms) / 10.0).abs()
            < 1e-12
    );
    assert_eq!(
        p.csv_row().split(',').count(),
        CSV_HEADER.split(',').count()
    );
}

#[test]
fn the_plot_is_an_svg_or_a_png_with_both_lines_and_other_formats_are_refused() {
    let c = ModelConfig::qwen3_0_6b();
    let points: Vec<Point> = [1, 8, 64]
        .iter()
        .map(|&b| Point::new(&c, 1.2e9, b, 512, 0.5 + b as f64 * 0.01, 4e12, 4e14))
        .collect();
    let dir = std::env::temp_dir().join(format!("braidinfer-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let svg = dir.join("sweep.svg");
    roofline_plot(&svg, "test", &points).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg"), "an SVG document");
    assert!(text.contains("measured, context 512") && text.contains("roofline, context 512"));

    // The PNG: the right size, the measured line in its colour, and text and axes in black.
    let png = dir.join("sweep.PNG");
    roofline_plot(&png, "test", &points).unwrap();
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (960, 640));
    let count = |want: fn(&image::Rgb<u8>) -> bool| image.pixels().filter(|p| want(p)).count();
    let line = count(|p| p.0 == [230, 25, 75]); // plotters' Palette99 colour 0
    let dark = count(|p| p.0.iter().all(|&c| c < 96));
    assert!(line > 500, "{line} pixels of the measured line");
    assert!(dark > 1_000, "{dark} dark pixels: no text or axes");
    for bad in ["sweep.jpg", "sweep"] {
        let err = roofline_plot(&dir.join(bad), "test", &points).unwrap_err();
        assert!(format!("{err}").contains(".svg or .png"), "{err}");
        assert!(PlotFormat::of(&dir.join(bad)).is_err());
        assert!(!dir.join(bad).exists(), "{bad}: nothing written");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
