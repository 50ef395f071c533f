//! How close one model's logits are to another's, position by position: the accuracy half of a
//! quantized-against-bf16 comparison.

use serde::Serialize;

/// Logits of a reference and a candidate over the same positions.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LogitAgreement {
    pub positions: usize,
    /// Positions where the reference's top-2 margin is at least the near-tie threshold.
    pub decided: usize,
    /// Of the decided positions, the share where both pick the same top-1 token.
    pub top1_agreement: f64,
    pub rel_l2_mean: f64,
    pub rel_l2_max: f64,
    /// KL(softmax(reference) || softmax(candidate)), nats.
    pub kl_mean: f64,
    pub kl_max: f64,
    pub max_abs_diff: f64,
}

/// Compares position by position; `near_tie`: top-2 logit margin below which the reference's
/// choice is not counted as decided.
pub fn compare_logits(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    near_tie: f32,
) -> LogitAgreement {
    assert_eq!(reference.len(), candidate.len(), "the same positions");
    let mut out = LogitAgreement {
        positions: reference.len(),
        ..Default::default()
    };
    let mut agree = 0;
    for (r, c) in reference.iter().zip(candidate) {
        assert_eq!(r.len(), c.len(), "the same vocabulary");
        let (best, margin) = top1_and_margin(r);
        if margin >= near_tie {
            out.decided += 1;
            agree += usize::from(top1_and_margin(c).0 == best);
        }
        let rel = rel_l2(c, r);
        let kl = kl_divergence(r, c);
        out.rel_l2_mean += rel;
        out.rel_l2_max = out.rel_l2_max.max(rel);
        out.kl_mean += kl;
        out.kl_max = out.kl_max.max(kl);
        let diff = r
            .iter()
            .zip(c)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        out.max_abs_diff = out.max_abs_diff.max(diff);
    }
    if out.positions > 0 {
        out.rel_l2_mean /= out.positions as f64;
        out.kl_mean /= out.positions as f64;
    }
    out.top1_agreement = if out.decided > 0 {
        agree as f64 / out.decided as f64
    } else {
        1.0
    };
    out
}

/// Top-1 agreement on the positions where the reference's top-2 margin is at least `margin`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MarginAgreement {
    pub margin: f32,
    pub decided: usize,
    pub top1_agreement: f64,
}

/// Top-1 agreement at each of `margins`: what counts as a near tie changes the figure, so a
/// comparison reports several.
pub fn top1_agreement_by_margin(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    margins: &[f32],
) -> Vec<MarginAgreement> {
    let picks: Vec<(usize, f32, usize)> = reference
        .iter()
        .zip(candidate)
        .map(|(r, c)| {
            let (best, margin) = top1_and_margin(r);
            (best, margin, top1_and_margin(c).0)
        })
        .collect();
    margins
        .iter()
        .map(|&margin| {
            let decided: Vec<_> = picks.iter().filter(|p| p.1 >= margin).collect();
            let agree = decided.iter().filter(|p| p.0 == p.2).count();
            MarginAgreement {
                margin,
                decided: decided.len(),
                top1_agreement: if decided.is_empty() {
                    1.0
                } else {
                    agree as f64 / decided.len() as f64
                },
            }
        })
        .collect()
}

/// The index of the largest logit and its margin over the second largest.
fn top1_and_margin(logits: &[f32]) -> (usize, f32) {
    let (mut best, mut first, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > first {
            (second, first, best) = (first, v, i);
        } else if v > second {
            second = v;
        }
    }
    (best, first - second)
}

/// ||candidate - reference|| / ||reference||; the two must be of one length.
pub fn rel_l2(candidate: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(candidate.len(), reference.len(), "unequal lengths");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&c, &r) in candidate.iter().zip(reference) {
        diff += (c as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// KL(softmax(p) || softmax(q)) in f64, nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |logits: &[f32]| -> Vec<f64> {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_sum = sum.ln() + max;
        logits.iter().map(|&v| v as f64 - log_sum).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}
