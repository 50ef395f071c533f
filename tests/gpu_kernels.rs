//! The embedding, RMSNorm and sampling kernels against the CPU reference on fresh random inputs,
//! outputs poisoned before each launch. Skips with a visible line where there is no GPU (fails
//! instead under gpu-test.sh). The products are in gpu_products.rs, attention in
//! gpu_attention.rs.

mod common;

use braidinfer::gpu::kernels::{self, SampleState, SamplingParamsRaw};
use braidinfer::reference::rms_norm;
use braidinfer::sampling::{sample, SamplingParams};
use half::bf16;

use common::{bits_to_f32, random_bf16, POISON_BF16};

#[test]
fn gpu_embedding_gathers_rows() {
    let Some(gpu) = common::gpu_or_skip("gpu_embedding_gathers_rows") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_embedding");
    let (vocab, hidden, m) = (5000, 1024, 9);
    let table = random_bf16(&mut rng, vocab * hidden, 0.05);
    let mut tokens: Vec<i32> = (0..m)
        .map(|_| (rng.next_u64() % vocab as u64) as i32)
        .collect();
    tokens[3] = -1; // out of range: zeros
    tokens[7] = vocab as i32;
    let d_table = gpu.upload(&table).unwrap();
    let d_tokens = gpu.upload(&tokens).unwrap();
    let mut d_x = gpu.upload(&vec![f32::NAN; m * hidden]).unwrap();
    kernels::embedding(&gpu, &mut d_x, &d_table, &d_tokens, m, hidden, vocab).unwrap();
    let x = gpu.download(&d_x).unwrap();
    for (r, &t) in tokens.iter().enumerate() {
        for i in 0..hidden {
            let expected = if (0..vocab as i32).contains(&t) {
                bf16::from_bits(table[t as usize * hidden + i]).to_f32()
            } else {
                0.0
            };
            assert_eq!(x[r * hidden + i], expected, "row {r} col {i}");
        }
    }
}

#[test]
fn gpu_rmsnorm_matches_reference() {
    let Some(gpu) = common::gpu_or_skip("gpu_rmsnorm_matches_reference") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_rmsnorm");
    let (m, hidden, eps) = (13, 1024, 1e-6);
    let x: Vec<f32> = (0..m * hidden)
        .map(|i| rng.centered(0.5 + (i / hidden) as f32))
        .collect();
    let mut weight: Vec<f32> = (0..hidden).map(|_| rng.range(0.5, 2.0)).collect();
    weight[17] = 90.0;
    let weight_bits: Vec<u16> = weight
        .iter()
        .map(|&w| bf16::from_f32(w).to_bits())
        .collect();
    let weight_f32 = bits_to_f32(&weight_bits);
    let d_x = gpu.upload(&x).unwrap();
    let d_w = gpu.upload(&weight_bits).unwrap();
    let mut d_out = gpu.upload(&vec![POISON_BF16; m * hidden]).unwrap();
    kernels::rmsnorm(&gpu, &mut d_out, &d_x, &d_w, m, hidden, eps).unwrap();
    let out = bits_to_f32(&gpu.download(&d_out).unwrap());
    common::assert_all_finite(&out, "rmsnorm out");
    for r in 0..m {
        let expected = rms_norm(&x[r * hidden..(r + 1) * hidden], &weight_f32, eps);
        for i in 0..hidden {
            let (got, want) = (out[r * hidden + i], expected[i]);
            // bf16 output: at most one rounding step (2^-8 relative) from the f32 reference.
            assert!(
                (got - want).abs() <= want.abs() * 2f32.powi(-8) + 1e-6,
                "row {r} col {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn gpu_sampler_matches_the_host_sampler() {
    let Some(gpu) = common::gpu_or_skip("gpu_sampler_matches_the_host_sampler") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_sampler");
    let vocab = 151_936;
    let settings = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.6,
            top_k: 20,
            top_p: 0.95,
            seed: 7,
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 64,
            top_p: 1.0,
            seed: 1 << 40,
        },
        SamplingParams {
            temperature: 0.9,
            top_k: 5,
            top_p: 0.5,
            seed: 3,
        },
    ];
    let batch = settings.len() + 1; // the last row is padding
    let params: Vec<SamplingParamsRaw> = (0..batch)
        .map(|b| kernels::sampling_params_raw(&settings[b.min(settings.len() - 1)], b as u32))
        .collect();
    let d_params = gpu.upload(&params).unwrap();
    let (mut agree, mut total) = (0, 0);
    for step in 0..50u32 {
        // Logits with a few strong candidates, so that sampling has real choices.
        let logits: Vec<f32> = (0..batch * vocab)
            .map(|_| {
                let u = rng.uniform();
                if u > 0.9995 {
                    rng.range(8.0, 12.0)
                } else {
                    rng.centered(2.0)
                }
            })
            .collect();
        let mut positions: Vec<i32> = (0..batch as i32).map(|b| 100 + b).collect();
        positions[batch - 1] = -1;
        let mut d_tokens = gpu.upload(&vec![-7i32; batch]).unwrap();
        let mut d_positions = gpu.upload(&positions).unwrap();
        let mut d_steps = gpu.upload(&vec![step; batch]).unwrap();
        let mut d_values = gpu
            .alloc::<f32>(batch * kernels::SAMPLE_CHUNKS * kernels::MAX_TOP_K)
            .unwrap();
        let mut d_ids = gpu
            .alloc::<i32>(batch * kernels::SAMPLE_CHUNKS * kernels::MAX_TOP_K)
            .unwrap();
        let state = SampleState {
            tokens: &mut d_tokens,
            positions: &mut d_positions,
            steps: &mut d_steps,
        };
        kernels::sample(
            &gpu,
            state,
            &mut d_values,
            &mut d_ids,
            &gpu.upload(&logits).unwrap(),
            &d_params,
            batch,
            vocab,
        )
        .unwrap();
        let tokens = gpu.download(&d_tokens).unwrap();
        let new_positions = gpu.download(&d_positions).unwrap();
        let steps = gpu.download(&d_steps).unwrap();
        for b in 0..batch - 1 {
            let want = sample(
                &logits[b * vocab..(b + 1) * vocab],
                &settings[b],
                b as u32,
                step,
            );
            if b == 0 {
                assert_eq!(tokens[b] as u32, want, "greedy must be the argmax");
            }
            total += 1;
            agree += (tokens[b] as u32 == want) as usize;
            assert_eq!(
                (new_positions[b], steps[b]),
                (positions[b] + 1, step + 1),
                "position and step advance"
            );
        }
        assert_eq!(
            (
                tokens[batch - 1],
                new_positions[batch - 1],
                steps[batch - 1]
            ),
            (-7, -1, step),
            "padding row untouched"
        );
    }
    // The device's expf may differ from the host's by an ulp, which can flip a draw that lands
    // exactly on a boundary; anything beyond that is a bug.
    assert!(
        agree * 100 >= total * 99,
        "device and host samplers agree on {agree} of {total} draws"
    );
}
