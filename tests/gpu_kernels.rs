//! GPU kernels against the CPU reference on fresh random inputs, outputs poisoned before each
//! launch. Skips with a visible line where there is no GPU (fails instead under gpu-test.sh).

mod common;

use braidinfer::gpu::kernels;
use braidinfer::reference::rms_norm;
use braidinfer::rng::SplitMix64;
use half::bf16;

/// Fresh inputs every run; the seed is printed so a failure can be replayed.
fn fresh_rng(test: &str) -> SplitMix64 {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("{test}: seed {seed}");
    SplitMix64::new(seed)
}

fn random_bf16(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<u16> {
    (0..n).map(|_| bf16::from_f32(rng.centered(std)).to_bits()).collect()
}

const POISON_BF16: u16 = 0x7FC1; // a NaN

#[test]
fn gpu_embedding_gathers_rows() {
    let Some(gpu) = common::gpu_or_skip("gpu_embedding_gathers_rows") else { return };
    let mut rng = fresh_rng("gpu_embedding");
    let (vocab, hidden, m) = (5000, 1024, 9);
    let table = random_bf16(&mut rng, vocab * hidden, 0.05);
    let mut tokens: Vec<i32> = (0..m).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
    tokens[3] = -1; // out of range: zeros
    tokens[7] = vocab as i32;
    let d_table = gpu.upload(&table).unwrap();
    let d_tokens = gpu.upload(&tokens).unwrap();
    let mut d_x = gpu.upload(&vec![f32::NAN; m * hidden]).unwrap();
    kernels::embedding(&gpu, &mut d_x, &d_table, &d_tokens, m, hidden, vocab).unwrap();
    let x = gpu.download(&d_x).unwrap();
    for (r, &t) in tokens.iter().enumerate() {
        for i in 0..hidden {
            let expected = if (0..vocab as i32).contains(&t) { bf16::from_bits(table[t as usize * hidden + i]).to_f32() } else { 0.0 };
            assert_eq!(x[r * hidden + i], expected, "row {r} col {i}");
        }
    }
}

#[test]
fn gpu_rmsnorm_matches_reference() {
    let Some(gpu) = common::gpu_or_skip("gpu_rmsnorm_matches_reference") else { return };
    let mut rng = fresh_rng("gpu_rmsnorm");
    let (m, hidden, eps) = (13, 1024, 1e-6);
    let x: Vec<f32> = (0..m * hidden).map(|i| rng.centered(0.5 + (i / hidden) as f32)).collect();
    let mut weight: Vec<f32> = (0..hidden).map(|_| rng.range(0.5, 2.0)).collect();
    weight[17] = 90.0;
    let weight_bits: Vec<u16> = weight.iter().map(|&w| bf16::from_f32(w).to_bits()).collect();
    let weight_f32: Vec<f32> = weight_bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    let d_x = gpu.upload(&x).unwrap();
    let d_w = gpu.upload(&weight_bits).unwrap();
    let mut d_out = gpu.upload(&vec![POISON_BF16; m * hidden]).unwrap();
    kernels::rmsnorm(&gpu, &mut d_out, &d_x, &d_w, m, hidden, eps).unwrap();
    let out: Vec<f32> = gpu.download(&d_out).unwrap().into_iter().map(|b| bf16::from_bits(b).to_f32()).collect();
    common::assert_all_finite(&out, "rmsnorm out");
    for r in 0..m {
        let expected = rms_norm(&x[r * hidden..(r + 1) * hidden], &weight_f32, eps);
        for i in 0..hidden {
            let (got, want) = (out[r * hidden + i], expected[i]);
            // bf16 output: at most one rounding step (2^-8 relative) from the f32 reference.
            assert!((got - want).abs() <= want.abs() * 2f32.powi(-8) + 1e-6, "row {r} col {i}: {got} vs {want}");
        }
    }
}
