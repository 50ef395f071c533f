//! Host sampling semantics: greedy is argmax, top-k and top-p masks, seeded reproducibility.

use braidinfer::rng::{sampling_uniform, SplitMix64};
use braidinfer::sampling::{argmax, candidates, sample, top_k, SamplingParams};

fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.range(-5.0, 5.0)).collect()
}

#[test]
fn greedy_is_argmax_with_lowest_index_on_ties() {
    let l = logits(1000, 1);
    let best = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let expected = l.iter().position(|&v| v == best).unwrap() as u32;
    assert_eq!(sample(&l, &SamplingParams::greedy(), 0, 0), expected);
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    let t0 = SamplingParams {
        temperature: 0.0,
        top_k: 20,
        top_p: 0.9,
        seed: 5,
    };
    assert_eq!(sample(&l, &t0, 0, 3), expected);
}

#[test]
fn top_k_keeps_the_k_largest_in_order() {
    let l = logits(500, 2);
    let kept = top_k(&l, 10);
    assert_eq!(kept.len(), 10);
    let mut sorted = l.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    for (i, &(id, v)) in kept.iter().enumerate() {
        assert_eq!(v, sorted[i]);
        assert_eq!(l[id as usize], v);
    }
    assert_eq!(top_k(&[2.0, 5.0, 5.0, 1.0], 2), vec![(1, 5.0), (2, 5.0)]);
}

#[test]
fn samples_stay_inside_top_k() {
    let l = logits(2000, 3);
    let params = SamplingParams {
        temperature: 1.5,
        top_k: 5,
        top_p: 1.0,
        seed: 11,
    };
    let allowed: Vec<u32> = top_k(&l, 5).iter().map(|&(id, _)| id).collect();
    let mut seen = std::collections::HashSet::new();
    for step in 0..400 {
        let t = sample(&l, &params, 0, step);
        assert!(allowed.contains(&t), "sampled {t} outside top-5");
        seen.insert(t);
    }
    assert!(
        seen.len() > 1,
        "a temperature of 1.5 over 5 close candidates should vary"
    );
}

#[test]
fn top_p_keeps_the_shortest_prefix_reaching_p() {
    // Probabilities at temperature 1: about 0.64, 0.24, 0.09, 0.03.
    let l = [3.0, 2.0, 1.0, 0.0];
    let params = |top_p| SamplingParams {
        temperature: 1.0,
        top_k: 4,
        top_p,
        seed: 0,
    };
    assert_eq!(candidates(&l, &params(0.5)).len(), 1);
    assert_eq!(candidates(&l, &params(0.7)).len(), 2);
    assert_eq!(candidates(&l, &params(0.95)).len(), 3);
    assert_eq!(candidates(&l, &params(1.0)).len(), 4);
    for step in 0..200 {
        assert_eq!(sample(&l, &params(0.5), 0, step), 0);
    }
}

#[test]
fn sampling_frequencies_follow_the_distribution() {
    let l = [1.0f32.ln(), 3.0f32.ln()]; // probabilities 1/4 and 3/4
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
        seed: 99,
    };
    let ones = (0..4000)
        .filter(|&s| sample(&l, &params, 0, s) == 1)
        .count();
    let share = ones as f64 / 4000.0;
    assert!(
        (share - 0.75).abs() < 0.03,
        "share of the 3/4 token: {share}"
    );
}

#[test]
fn a_seed_reproduces_a_run_and_another_seed_differs() {
    let l = logits(5000, 4);
    let run = |seed| {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            seed,
        };
        (0..64)
            .map(|step| sample(&l, &p, 0, step))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    assert_ne!(sampling_uniform(1, 0, 0), sampling_uniform(1, 1, 0));
}

#[test]
fn invalid_parameters_are_rejected() {
    let ok = SamplingParams {
        temperature: 0.6,
        top_k: 20,
        top_p: 0.95,
        seed: 0,
    };
    assert!(ok.validate().is_ok());
    assert!(SamplingParams {
        temperature: -0.1,
        ..ok
    }
    .validate()
    .is_err());
    assert!(SamplingParams {
        temperature: f32::NAN,
        ..ok
    }
    .validate()
    .is_err());
    assert!(SamplingParams { top_p: 0.0, ..ok }.validate().is_err());
    assert!(SamplingParams { top_p: 1.01, ..ok }.validate().is_err());
    assert!(SamplingParams { top_k: 0, ..ok }.validate().is_err());
    assert!(SamplingParams { top_k: 65, ..ok }.validate().is_err());
}

#[test]
fn philox_matches_the_random123_known_answers() {
    use braidinfer::rng::philox4x32;
    assert_eq!(philox4x32([0; 4], [0; 2]), 0x6627_e8d5);
    assert_eq!(philox4x32([u32::MAX; 4], [u32::MAX; 2]), 0x408f_276d);
}
