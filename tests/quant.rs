//! INT8 weights: per-channel quantization bounds, edge rows, the comparison metrics, and the
//! INT8 CPU model against the bf16 one.

use braidinfer::compare::{compare_logits, kl_divergence, rel_l2, top1_agreement_by_margin};
use braidinfer::config::ModelConfig;
use braidinfer::quant::{Int8Matrix, Quant};
use braidinfer::reference::CpuModel;
use braidinfer::rng::SplitMix64;
use braidinfer::synthetic::synthetic_weights;

fn assert_within_half_a_step(w: &[f32], q: &Int8Matrix) {
    let back = q.dequantize();
    for (r, (row, back_row)) in w.chunks(q.cols).zip(back.chunks(q.cols)).enumerate() {
        let scale = q.scales[r];
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(scale, absmax / 127.0, "row {r}: scale = absmax / 127");
        for (c, (&a, &b)) in row.iter().zip(back_row).enumerate() {
            // Half a step, plus the f32 rounding of the division and the product.
            assert!(
                (a - b).abs() <= scale / 2.0 * (1.0 + 1e-5) + f32::EPSILON * a.abs(),
                "row {r}, col {c}: {a} -> {b} (scale {scale})"
            );
        }
    }
}

#[test]
fn per_channel_error_is_within_half_a_step() {
    let mut rng = SplitMix64::new(11);
    let (rows, cols) = (64, 256);
    // Rows of different magnitudes, every fourth with one outlier 200x its spread.
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let spread = 0.001 * (1 + r) as f32;
            if r % 4 == 0 && c == r {
                200.0 * spread
            } else {
                rng.centered(spread)
            }
        })
        .collect();
    let q = Int8Matrix::quantize(&w, rows, cols);
    assert_eq!(q.values.len(), rows * cols);
    assert_eq!(q.bytes(), rows * cols + 4 * rows);
    assert_within_half_a_step(&w, &q);
    // The outlier sets its row's scale and comes back to within rounding.
    assert_eq!(q.values[cols * 4 + 4].unsigned_abs(), 127);
}

#[test]
fn zero_and_constant_rows_are_exact_and_finite() {
    let cols = 16;
    let mut w = vec![0.0f32; cols]; // a zero row
    w.extend(vec![0.37f32; cols]); // a constant row
    w.extend(vec![-2.5f32; cols]); // a negative constant row
    let q = Int8Matrix::quantize(&w, 3, cols);
    assert_eq!(q.scales[0], 0.0);
    assert!(q.values[..cols].iter().all(|&v| v == 0));
    assert!(q.values[cols..2 * cols].iter().all(|&v| v == 127));
    assert!(q.values[2 * cols..].iter().all(|&v| v == -127));
    let back = q.dequantize();
    assert!(back.iter().all(|v| v.is_finite()));
    assert!(back[..cols].iter().all(|&v| v == 0.0));
    assert_within_half_a_step(&w, &q);
}

#[test]
fn comparison_metrics_behave() {
    let a = vec![1.0f32, 3.0, 0.5, -1.0];
    // Identical: no error, full agreement.
    let same = compare_logits(std::slice::from_ref(&a), std::slice::from_ref(&a), 0.1);
    assert_eq!(
        (same.decided, same.top1_agreement, same.max_abs_diff),
        (1, 1.0, 0.0)
    );
    assert!(same.kl_max.abs() < 1e-12 && same.rel_l2_max == 0.0);
    // A constant shift: the same distribution (KL 0) but a logit error.
    let shifted: Vec<f32> = a.iter().map(|v| v + 0.5).collect();
    assert!(kl_divergence(&a, &shifted) < 1e-12);
    assert!(rel_l2(&shifted, &a) > 0.1);
    // The top two swapped: disagreement on a decided position; KL > 0.
    let swapped = vec![3.0f32, 1.0, 0.5, -1.0];
    let diff = compare_logits(
        std::slice::from_ref(&a),
        std::slice::from_ref(&swapped),
        0.1,
    );
    assert_eq!((diff.decided, diff.top1_agreement), (1, 0.0));
    assert!(diff.kl_mean > 0.1 && (diff.max_abs_diff - 2.0).abs() < 1e-9);
    // A near tie in the reference is not counted.
    let tie = vec![1.0f32, 1.05, 0.0, 0.0];
    let untied = compare_logits(
        std::slice::from_ref(&tie),
        std::slice::from_ref(&swapped),
        0.1,
    );
    assert_eq!((untied.decided, untied.top1_agreement), (0, 1.0));
    // By margin: position 0 (margin 2, agreeing) and position 1 (margin 0.05, flipped).
    let by_margin = top1_agreement_by_margin(&[a.clone(), tie], &[a, swapped], &[0.0, 0.1, 5.0]);
    let figures: Vec<(usize, f64)> = by_margin
        .iter()
        .map(|m| (m.decided, m.top1_agreement))
        .collect();
    assert_eq!(figures, [(2, 0.5), (1, 1.0), (0, 1.0)]);
}

#[test]
#[should_panic(expected = "unequal lengths")]
fn rel_l2_refuses_unequal_lengths() {
    rel_l2(&[1.0, 2.0], &[1.0]);
}

#[test]
fn int8_cpu_model_agrees_with_bf16_on_the_synthetic_model() {
    let config = ModelConfig {
        layers: 2,
        vocab: 4096,
        ..ModelConfig::qwen3_0_6b()
    };
    let weights = synthetic_weights(&config, 5);
    let bf16 = CpuModel::new(&config, &weights);
    let int8 = CpuModel::new(&config, &weights).with_weights(Quant::Int8);
    let (mut a, mut b) = (bf16.new_cache(), int8.new_cache());
    let mut rng = SplitMix64::new(6);
    let (mut reference, mut candidate) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let token = (rng.next_u64() % config.vocab as u64) as u32;
        reference.push(bf16.forward(token, &mut a).unwrap());
        candidate.push(int8.forward(token, &mut b).unwrap());
    }
    // INT8 moves these logits by up to ~0.5 (2% relative): a top-2 margin under 0.2 is a near
    // tie (at a 0.05 margin, 2 of 38 positions flipped in this run).
    let agreement = compare_logits(&reference, &candidate, 0.2);
    eprintln!("int8 vs bf16 weights on the CPU: {agreement:?}");
    assert!(
        agreement.decided >= 20,
        "most positions are decided: {agreement:?}"
    );
    assert!(agreement.top1_agreement >= 0.99, "{agreement:?}");
    assert!(
        agreement.rel_l2_max < 0.1 && agreement.kl_max < 0.01,
        "{agreement:?}"
    );
}
