//! GPU kernels against the CPU reference on fresh random inputs, outputs poisoned before each
//! launch. Skips with a visible line where there is no GPU (fails instead under gpu-test.sh).

mod common;

use braidinfer::compare::rel_l2;
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kernels::{
    self, Epilogue, LayerCache, Matrix, Placement, Rows, SampleState, SamplingParamsRaw,
};
use braidinfer::gpu::weights::rope_inv_freq;
use braidinfer::gpu::Gpu;
use braidinfer::quant::Int8Matrix;
use braidinfer::reference::{attention, rms_norm, rope, silu};
use braidinfer::rng::SplitMix64;
use braidinfer::sampling::{sample, SamplingParams};
use half::bf16;

fn random_bf16(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<u16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.centered(std)).to_bits())
        .collect()
}

const POISON_BF16: u16 = 0x7FC1; // a NaN

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
    let weight_f32: Vec<f32> = weight_bits
        .iter()
        .map(|&b| bf16::from_bits(b).to_f32())
        .collect();
    let d_x = gpu.upload(&x).unwrap();
    let d_w = gpu.upload(&weight_bits).unwrap();
    let mut d_out = gpu.upload(&vec![POISON_BF16; m * hidden]).unwrap();
    kernels::rmsnorm(&gpu, &mut d_out, &d_x, &d_w, m, hidden, eps).unwrap();
    let out: Vec<f32> = gpu
        .download(&d_out)
        .unwrap()
        .into_iter()
        .map(|b| bf16::from_bits(b).to_f32())
        .collect();
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

fn bits_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// a [m, k] . w[n, k]^T in f64, from the bf16 values.
fn matmul_ref(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows_per_thread = m.div_ceil(threads);
    std::thread::scope(|scope| {
        for (chunk, rows) in out.chunks_mut(rows_per_thread * n).enumerate() {
            scope.spawn(move || {
                for (i, out_row) in rows.chunks_mut(n).enumerate() {
                    let a_row = &a[(chunk * rows_per_thread + i) * k..][..k];
                    for (c, v) in out_row.iter_mut().enumerate() {
                        *v = a_row
                            .iter()
                            .zip(&w[c * k..(c + 1) * k])
                            .map(|(&x, &y)| x as f64 * y as f64)
                            .sum::<f64>() as f32;
                    }
                }
            });
        }
    });
    out
}

/// Random weights [n, k] on the device, bf16 or quantized to INT8 there, and the f32 values the
/// product stands for (for INT8: the CPU quantizer's dequantized values, after checking that
/// the device quantized exactly as it does).
fn product_weights(
    gpu: &Gpu,
    rng: &mut SplitMix64,
    n: usize,
    k: usize,
    int8: bool,
) -> (Matrix, Vec<f32>) {
    let w_bits = random_bf16(rng, n * k, 1.0 / (k as f32).sqrt());
    let bf16 = gpu.upload(&w_bits).unwrap();
    if !int8 {
        return (Matrix::Bf16(bf16), bits_to_f32(&w_bits));
    }
    let quantized = Matrix::quantize(gpu, &bf16, n, k).unwrap();
    let host = Int8Matrix::quantize(&bits_to_f32(&w_bits), n, k);
    assert_eq!(
        download_int8(gpu, &quantized),
        host,
        "device quantization of [{n}, {k}]"
    );
    (quantized, host.dequantize())
}

fn download_int8(gpu: &Gpu, matrix: &Matrix) -> Int8Matrix {
    let Matrix::Int8 { values, scales } = matrix else {
        panic!("an INT8 matrix");
    };
    let scales = gpu.download(scales).unwrap();
    let values = gpu.download(values).unwrap();
    Int8Matrix {
        rows: scales.len(),
        cols: values.len() / scales.len(),
        values,
        scales,
    }
}

fn run_linear_case(
    gpu: &Gpu,
    rng: &mut SplitMix64,
    (m, n, k): (usize, usize, usize),
    int8: bool,
    placement: Placement,
) {
    let a_bits = random_bf16(rng, m * k, 1.0);
    let (d_w, w) = product_weights(gpu, rng, n, k, int8);
    let a = bits_to_f32(&a_bits);
    let expected = matmul_ref(&a, &w, m, n, k);
    let d_a = gpu.upload(&a_bits).unwrap();

    // Store: f32 accumulation of exact bf16 products (INT8 values are exact in bf16, and the
    // row scale multiplies the sum once); only the summation order differs.
    let mut d_out = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
    kernels::linear(
        gpu,
        &mut d_out,
        &d_a,
        d_w.view(),
        (m, n, k),
        Epilogue::Store,
        placement,
    )
    .unwrap();
    let out = gpu.download(&d_out).unwrap();
    common::assert_all_finite(&out, "linear store");
    let err = rel_l2(&out, &expected);
    assert!(
        err < 1e-5,
        "linear m={m} n={n} k={k} int8={int8} {placement:?}: relative L2 {err:.2e}"
    );
    // Bit-identical when repeated: split-k partials are added in split order, whatever the
    // timing of the cluster's blocks.
    let mut again = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
    kernels::linear(
        gpu,
        &mut again,
        &d_a,
        d_w.view(),
        (m, n, k),
        Epilogue::Store,
        placement,
    )
    .unwrap();
    let again = gpu.download(&again).unwrap();
    assert!(
        out.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "linear m={m} n={n} k={k} int8={int8} {placement:?}: a repeated product differs"
    );

    // AddResidual: adds onto what is there.
    let base: Vec<f32> = (0..m * n).map(|_| rng.centered(1.0)).collect();
    let mut d_x = gpu.upload(&base).unwrap();
    kernels::linear(
        gpu,
        &mut d_x,
        &d_a,
        d_w.view(),
        (m, n, k),
        Epilogue::AddResidual,
        placement,
    )
    .unwrap();
    let x = gpu.download(&d_x).unwrap();
    let want: Vec<f32> = base.iter().zip(&expected).map(|(b, e)| b + e).collect();
    let err = rel_l2(&x, &want);
    assert!(
        err < 1e-5,
        "linear add m={m} n={n} k={k} int8={int8} {placement:?}: relative L2 {err:.2e}"
    );
}

/// How far the product of normalized rows [m, k] with w [n, k] may move (L2 norm over the whole
/// output) when the GPU rounds some activations to the other bf16 neighbour. Its 1/rms differs
/// from the CPU's in the last bits (another summation order, rsqrtf), so an activation whose
/// exact value lies within 1e-5 (relative) of the midpoint between two bf16 values may round
/// either way; each such flip moves its output row by at most |step| * ||w[:, k]||. (Column 7,
/// whose norm weight is 40, moves a row most: one flip there cost a 12-row product 2.5e-3.)
fn bf16_flip_allowance(
    x: &[f32],
    norm: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
) -> f64 {
    let column_norms: Vec<f64> = (0..k)
        .map(|c| {
            (0..n)
                .map(|r| (w[r * k + c] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut total = 0.0;
    for row in x.chunks(k).take(m) {
        let mean_sq = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64;
        let inv = 1.0 / (mean_sq + 1e-6).sqrt();
        let mut moved = 0.0;
        for (c, &v) in row.iter().enumerate() {
            let exact = v as f64 * inv * norm[c] as f64;
            let near = bf16::from_f64(exact);
            let neighbours = [
                near,
                bf16::from_bits(near.to_bits().wrapping_add(1)),
                bf16::from_bits(near.to_bits().wrapping_sub(1)),
            ]
            .map(|b| b.to_f64());
            let below = neighbours
                .iter()
                .copied()
                .filter(|&b| b <= exact)
                .fold(f64::MIN, f64::max);
            let above = neighbours
                .iter()
                .copied()
                .filter(|&b| b >= exact)
                .fold(f64::MAX, f64::min);
            if (exact - (below + above) / 2.0).abs() < 1e-5 * exact.abs() {
                moved += (above - below) * column_norms[c];
            }
        }
        total += moved * moved;
    }
    total.sqrt()
}

/// RMSNorm fused in front of the product, against rmsnorm -> bf16 -> product on the CPU.
fn run_norm_linear_case(
    gpu: &Gpu,
    rng: &mut SplitMix64,
    (m, n, k): (usize, usize, usize),
    int8: bool,
    placement: Placement,
) {
    let x: Vec<f32> = (0..m * k)
        .map(|i| rng.centered(0.3 + (i / k) as f32))
        .collect();
    let mut norm: Vec<f32> = (0..k).map(|_| rng.range(0.5, 2.0)).collect();
    norm[7] = 40.0;
    let norm_bits: Vec<u16> = norm.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let norm_f32 = bits_to_f32(&norm_bits);
    let (d_w, w) = product_weights(gpu, rng, n, k, int8);
    let a: Vec<f32> = (0..m)
        .flat_map(|r| rms_norm(&x[r * k..(r + 1) * k], &norm_f32, 1e-6))
        .map(|v| bf16::from_f32(v).to_f32())
        .collect();
    let expected = matmul_ref(&a, &w, m, n, k);
    let (d_x, d_norm) = (gpu.upload(&x).unwrap(), gpu.upload(&norm_bits).unwrap());
    let mut scratch = gpu.alloc::<u16>(m * k).unwrap();
    let mut d_out = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
    kernels::norm_linear(
        gpu,
        &mut d_out,
        &d_x,
        &d_norm,
        1e-6,
        d_w.view(),
        &mut scratch,
        (m, n, k),
        kernels::NormEpilogue::Store,
        placement,
    )
    .unwrap();
    let out = gpu.download(&d_out).unwrap();
    common::assert_all_finite(&out, "norm_linear out");
    // f32 summation order (as in the linear test), plus the bf16 rounding flips the GPU's 1/rms
    // may cause (bf16_flip_allowance).
    let norm_of_expected = expected
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let bound = 1e-5 + bf16_flip_allowance(&x, &norm_f32, &w, (m, n, k)) / norm_of_expected;
    let err = rel_l2(&out, &expected);
    assert!(
        err < bound,
        "norm_linear m={m} n={n} k={k} int8={int8} {placement:?}: relative L2 {err:.2e}, bound {bound:.2e}"
    );

    // SwiGLU: rows 2i and 2i+1 are gate_i and up_i, the same f32 sums as the product above (same
    // kernel and splits), so it is checked against them: each bf16 output is within half a step
    // (2^-9 relative) of its exact value, plus the fast exp and division's error.
    let mut d_act = gpu.upload(&vec![POISON_BF16; m * n / 2]).unwrap();
    kernels::norm_linear(
        gpu,
        &mut d_act,
        &d_x,
        &d_norm,
        1e-6,
        d_w.view(),
        &mut scratch,
        (m, n, k),
        kernels::NormEpilogue::SwiGlu,
        placement,
    )
    .unwrap();
    let act = bits_to_f32(&gpu.download(&d_act).unwrap());
    common::assert_all_finite(&act, "swiglu out");
    let want: Vec<f32> = (0..m * n / 2)
        .map(|i| {
            let (r, j) = (i / (n / 2), i % (n / 2));
            silu(out[r * n + 2 * j]) * out[r * n + 2 * j + 1]
        })
        .collect();
    let err = rel_l2(&act, &want);
    assert!(
        err < 2f64.powi(-8),
        "swiglu m={m} n={n} k={k} int8={int8} {placement:?}: relative L2 {err:.2e} (bf16 output)"
    );
}

#[test]
fn gpu_linear_matches_reference_for_decode_and_prefill_shapes() {
    let Some(gpu) =
        common::gpu_or_skip("gpu_linear_matches_reference_for_decode_and_prefill_shapes")
    else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_linear");
    // Skinny tilings (m <= 16, in wider blocks above 8 rows: 12, 9, 16 here; up to 32 alone with
    // n <= 8192: two row tiles) and the tiled ones (64 or 128 rows by 128 columns; k split across
    // a cluster where the tiles are few: m = 17-32 beside another chain, m = 24 with n = 9216, 33,
    // 40, 64, 65, 200, 256 here), with the model's k and both n paths, for bf16 and INT8
    // weights; n = 1040 and n = 384 end in a partial tile; n > 8192 at m <= 16 is the LM head's
    // skinny shape (32-row blocks up to m = 8, 64-row blocks above). Products of 17-32 rows run
    // with both placements. (129, 53264, 1024): weights larger than L2 (bf16 and INT8), whose
    // grid runs row tiles along x.
    let placements = |m: usize| {
        if (17..=32).contains(&m) {
            vec![Placement::Alone, Placement::BesideChain]
        } else {
            vec![Placement::Alone]
        }
    };
    for int8 in [false, true] {
        for &dims in &[
            (1, 1024, 3072),
            (3, 4096, 1024),
            (16, 6144, 1024),
            (12, 4096, 1024),
            (9, 1024, 3072),
            (16, 1024, 2048),
            (17, 1024, 2048),
            (32, 1024, 3072),
            (33, 1040, 2048),
            (64, 2048, 1024),
            (65, 256, 1024),
            (200, 384, 3072),
            (256, 1024, 3072),
            (129, 53_264, 1024),
        ] {
            for placement in placements(dims.0) {
                run_linear_case(&gpu, &mut rng, dims, int8, placement);
            }
        }
        for &dims in &[
            (1, 4096, 1024),
            (1, 151_936, 1024),
            (12, 9216, 1024),
            (9, 6144, 1024),
            (16, 4096, 1024),
            (24, 9216, 1024),
            (32, 6144, 1024),
            (40, 1024, 1024),
            (130, 512, 1024),
        ] {
            for placement in placements(dims.0) {
                run_norm_linear_case(&gpu, &mut rng, dims, int8, placement);
            }
        }
    }
    let refused = kernels::linear(
        &gpu,
        &mut gpu.alloc::<f32>(16).unwrap(),
        &gpu.alloc::<u16>(100).unwrap(),
        Matrix::Bf16(gpu.alloc::<u16>(16 * 100).unwrap()).view(),
        (1, 16, 100),
        Epilogue::Store,
        Placement::Alone,
    );
    assert!(refused.is_err(), "k = 100 must be refused");
}

#[test]
fn gpu_quantize_matches_the_cpu_quantizer() {
    let Some(gpu) = common::gpu_or_skip("gpu_quantize_matches_the_cpu_quantizer") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_quantize");
    for &(rows, cols) in &[(37, 1024), (9, 3072), (5, 100)] {
        // Rows of different magnitudes, one with a 200x outlier, a zero row and a constant row.
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|i| rng.centered(0.01 * (1 + i / cols) as f32))
            .collect();
        w[3 * cols + 7] = 200.0 * 0.04;
        w[cols..2 * cols].fill(0.0);
        w[2 * cols..3 * cols].fill(-0.75);
        let bits: Vec<u16> = w.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let d_w = gpu.upload(&bits).unwrap();
        let mut values = gpu.upload(&vec![99i8; rows * cols]).unwrap();
        let mut scales = gpu.upload(&vec![f32::NAN; rows]).unwrap();
        kernels::quantize_int8(&gpu, &mut values, &mut scales, &d_w, rows, cols).unwrap();
        let got = Int8Matrix {
            rows,
            cols,
            values: gpu.download(&values).unwrap(),
            scales: gpu.download(&scales).unwrap(),
        };
        assert_eq!(
            got,
            Int8Matrix::quantize(&bits_to_f32(&bits), rows, cols),
            "[{rows}, {cols}]"
        );
        assert_eq!(got.scales[1], 0.0, "a zero row has scale 0");
    }
}

const KV_WIDTH: usize = kernels::KV_WIDTH;

/// Random block tables: sequence s owns `blocks_per_seq` distinct blocks in shuffled order.
fn shuffled_tables(rng: &mut SplitMix64, seqs: usize, blocks_per_seq: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..(seqs * blocks_per_seq) as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    ids
}

/// Positions 0..len of one sequence (block table `table`) from a paged [blocks, 8, 16, 128]
/// cache, as the CPU attention takes them: [len, 8 * 128].
fn gather_positions(cache: &[f32], table: &[i32], len: usize) -> Vec<f32> {
    (0..len)
        .flat_map(|t| {
            let start = (table[t / 16] as usize * 8 * 16 + t % 16) * 128;
            (0..8)
                .flat_map(move |h| cache[start + h * 16 * 128..start + h * 16 * 128 + 128].to_vec())
        })
        .collect()
}

#[test]
fn gpu_qk_norm_rope_writes_q_and_the_paged_cache() {
    let Some(gpu) = common::gpu_or_skip("gpu_qk_norm_rope_writes_q_and_the_paged_cache") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_qk_norm_rope");
    let config = ModelConfig::qwen3_0_6b();
    let (seqs, max_blocks, m) = (3, 300, 6);
    let tables = shuffled_tables(&mut rng, seqs, max_blocks);
    let positions: Vec<i32> = vec![0, 15, 16, 4000, 4799, -1]; // the last row is padding
    let row_seq: Vec<i32> = vec![0, 1, 2, 0, 2, 1];
    let qkv: Vec<f32> = (0..m * kernels::QKV_WIDTH)
        .map(|_| rng.centered(2.0))
        .collect();
    let mut norms: Vec<f32> = (0..2 * 128).map(|_| rng.range(0.5, 3.0)).collect();
    norms[128 + 5] = 96.0; // a k_norm outlier, as in the real checkpoint
    let norm_bits: Vec<u16> = norms.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let norm_f32 = bits_to_f32(&norm_bits);

    let cache_len = seqs * max_blocks * 16 * KV_WIDTH;
    let mut d_k = gpu.upload(&vec![POISON_BF16; cache_len]).unwrap();
    let mut d_v = gpu.upload(&vec![POISON_BF16; cache_len]).unwrap();
    let mut d_q = gpu
        .upload(&vec![POISON_BF16; m * kernels::Q_WIDTH])
        .unwrap();
    let (d_pos, d_seq, d_tables) = (
        gpu.upload(&positions).unwrap(),
        gpu.upload(&row_seq).unwrap(),
        gpu.upload(&tables).unwrap(),
    );
    let rows = Rows {
        positions: &d_pos,
        row_seq: &d_seq,
        block_tables: &d_tables,
        max_blocks,
        m,
    };
    kernels::qk_norm_rope_cache(
        &gpu,
        &mut d_q,
        LayerCache {
            k: &mut d_k,
            v: &mut d_v,
        },
        &gpu.upload(&qkv).unwrap(),
        &gpu.upload(&norm_bits[..128]).unwrap(),
        &gpu.upload(&norm_bits[128..]).unwrap(),
        &gpu.upload(&rope_inv_freq(&config)).unwrap(),
        &rows,
        config.rms_eps,
    )
    .unwrap();
    let (q, k, v) = (
        gpu.download(&d_q).unwrap(),
        gpu.download(&d_k).unwrap(),
        gpu.download(&d_v).unwrap(),
    );

    let close = |got: u16, want: f32, what: &str| {
        let got = bf16::from_bits(got).to_f32();
        assert!(
            (got - want).abs() <= want.abs() * 2f32.powi(-7) + 1e-3,
            "{what}: {got} vs {want}"
        );
    };
    for r in 0..m {
        let pos = positions[r];
        if pos < 0 {
            assert!(
                q[r * 2048..(r + 1) * 2048]
                    .iter()
                    .all(|&b| b == POISON_BF16),
                "padding row written"
            );
            continue;
        }
        let row = &qkv[r * kernels::QKV_WIDTH..(r + 1) * kernels::QKV_WIDTH];
        let block = tables[row_seq[r] as usize * max_blocks + pos as usize / 16] as usize;
        for head in 0..24 {
            let mut x = rms_norm(
                &row[head * 128..(head + 1) * 128],
                &norm_f32[if head < 16 { 0..128 } else { 128..256 }],
                config.rms_eps,
            );
            rope(&mut x, pos as usize, config.rope_theta);
            for d in 0..128 {
                let got = if head < 16 {
                    q[(r * 16 + head) * 128 + d]
                } else {
                    k[((block * 8 + head - 16) * 16 + pos as usize % 16) * 128 + d]
                };
                close(got, x[d], &format!("row {r} head {head} dim {d}"));
            }
        }
        for j in 0..8 {
            for d in 0..128 {
                let got = v[((block * 8 + j) * 16 + pos as usize % 16) * 128 + d];
                close(
                    got,
                    row[2048 + 1024 + j * 128 + d],
                    &format!("row {r} v head {j} dim {d}"),
                );
            }
        }
    }
    let written = k.iter().filter(|&&b| b != POISON_BF16).count();
    assert_eq!(
        written,
        5 * KV_WIDTH,
        "exactly one cache row per non-padding row"
    );
}

/// Shuffled block tables of `seqs` sequences and a random paged cache for them: (tables, K bits,
/// V bits). Peaky scores as with the real k_norm outliers: keys of varied scale.
fn random_paged_cache(
    rng: &mut SplitMix64,
    seqs: usize,
    max_blocks: usize,
) -> (Vec<i32>, Vec<u16>, Vec<u16>) {
    let tables = shuffled_tables(rng, seqs, max_blocks);
    let cache_len = seqs * max_blocks * 16 * KV_WIDTH;
    let k_bits = random_bf16(rng, cache_len, 3.0);
    (tables, k_bits, random_bf16(rng, cache_len, 1.0))
}

#[test]
fn gpu_attention_matches_reference_across_lengths_and_splits() {
    let Some(gpu) =
        common::gpu_or_skip("gpu_attention_matches_reference_across_lengths_and_splits")
    else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_attention");
    let max_blocks = 80;
    let (tables, k_bits, v_bits) = random_paged_cache(&mut rng, 4, max_blocks);
    let (k_all, v_all) = (bits_to_f32(&k_bits), bits_to_f32(&v_bits));
    let positions: Vec<i32> = vec![0, 16, 300, 1279, 37, -1];
    let row_seq: Vec<i32> = vec![0, 1, 2, 3, 0, 2];
    let m = positions.len();
    let q_bits = random_bf16(&mut rng, m * 2048, 1.0);
    let q = bits_to_f32(&q_bits);
    let (d_k, d_v, d_q) = (
        gpu.upload(&k_bits).unwrap(),
        gpu.upload(&v_bits).unwrap(),
        gpu.upload(&q_bits).unwrap(),
    );
    let (d_pos, d_seq, d_tables) = (
        gpu.upload(&positions).unwrap(),
        gpu.upload(&row_seq).unwrap(),
        gpu.upload(&tables).unwrap(),
    );
    let rows = Rows {
        positions: &d_pos,
        row_seq: &d_seq,
        block_tables: &d_tables,
        max_blocks,
        m,
    };
    for splits in [1, 3, 20, 32] {
        let mut d_out = gpu.upload(&vec![POISON_BF16; m * 2048]).unwrap();
        let mut d_partials = gpu
            .upload(&vec![f32::NAN; m * 16 * splits * kernels::PARTIAL_FLOATS])
            .unwrap();
        let mut d_counters = gpu.alloc::<i32>(m * 8).unwrap();
        kernels::attention(
            &gpu,
            &mut d_out,
            &mut d_partials,
            &mut d_counters,
            &d_q,
            &d_k,
            &d_v,
            &rows,
            splits,
        )
        .unwrap();
        let out = bits_to_f32(&gpu.download(&d_out).unwrap());
        assert!(
            gpu.download(&d_counters).unwrap().iter().all(|&c| c == 0),
            "completion counters must return to zero"
        );
        common::assert_all_finite(&out, "attention out");
        let table = |r: usize| &tables[row_seq[r] as usize * max_blocks..];
        let cache = (k_all.as_slice(), v_all.as_slice());
        assert_attention_rows(
            &out,
            &q,
            &positions,
            table,
            cache,
            &format!("{splits} splits"),
        );
    }
}

/// Attention rows [m, 2048] against the CPU (`attention` over positions 0..=positions[r] of the
/// row's block table, `table(r)`, in the paged `cache` (K, V)): padding rows (negative
/// position) must be zeros, the others within 4e-3 relative L2 (bf16 output, and in prefill
/// attention bf16 softmax weights in P.V: 2^-9 relative rounding each, over f32 math; decode
/// attention's queries, prepared on the GPU, within an ulp).
fn assert_attention_rows<'t>(
    out: &[f32],
    q: &[f32],
    positions: &[i32],
    table: impl Fn(usize) -> &'t [i32],
    (k_all, v_all): (&[f32], &[f32]),
    what: &str,
) {
    let config = ModelConfig::qwen3_0_6b();
    for (r, &position) in positions.iter().enumerate() {
        let got = &out[r * 2048..(r + 1) * 2048];
        if position < 0 {
            assert!(
                got.iter().all(|&v| v == 0.0),
                "{what}: padding row {r} must be zeros"
            );
            continue;
        }
        let len = position as usize + 1;
        let want = attention(
            &config,
            &q[r * 2048..(r + 1) * 2048],
            &gather_positions(k_all, table(r), len),
            &gather_positions(v_all, table(r), len),
        );
        let err = rel_l2(got, &want);
        assert!(
            err < 4e-3,
            "{what}: row {r} (length {len}): relative L2 {err:.2e}"
        );
    }
}

/// Prefill attention (row tiles of one sequence sharing K/V tiles) against the CPU: a prompt from
/// position 0 (one row, then 130 rows: a partial last tile), a later chunk of 199 rows
/// (positions 37..235, the first 37 already in the cache) and a padding row, and two prompts
/// packed back to back (40 rows of sequence 1, then 90 rows of sequence 0 from position 10, in
/// tiles from rows 0, 40 and 104). row_seq is read at each tile's first row only: the rest is
/// poison.
#[test]
fn gpu_prefill_attention_matches_reference() {
    let Some(gpu) = common::gpu_or_skip("gpu_prefill_attention_matches_reference") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_prefill_attention");
    let max_blocks = 16;
    let (tables, k_bits, v_bits) = random_paged_cache(&mut rng, 2, max_blocks);
    let (k_all, v_all) = (bits_to_f32(&k_bits), bits_to_f32(&v_bits));
    let d_tables = gpu.upload(&tables).unwrap();
    let (d_k, d_v) = (gpu.upload(&k_bits).unwrap(), gpu.upload(&v_bits).unwrap());
    // Each case: pieces (sequence, first position, rows) back to back; padding rows after them;
    // the row tiles.
    type Piece = (i32, usize, usize);
    type Case<'c> = (&'c [Piece], usize, &'c [(usize, usize)]);
    let cases: [Case; 4] = [
        (&[(1, 0, 1)], 0, &[(0, 1)]),
        (&[(1, 0, 130)], 0, &[(0, 64), (64, 64), (128, 2)]),
        (
            &[(0, 37, 199)],
            1,
            &[(0, 64), (64, 64), (128, 64), (192, 8)],
        ),
        (
            &[(1, 0, 40), (0, 10, 90)],
            0,
            &[(0, 40), (40, 64), (104, 26)],
        ),
    ];
    let mut d_tiles = kernels::RowTiles::new(&gpu, 4).unwrap();
    for (pieces, padding, row_tiles) in cases {
        let (mut positions, mut seq_of_row) = (Vec::new(), Vec::new());
        for &(seq, first, len) in pieces {
            positions.extend((first..first + len).map(|p| p as i32));
            seq_of_row.extend(std::iter::repeat_n(seq, len));
        }
        positions.extend(std::iter::repeat_n(-1, padding));
        seq_of_row.extend(std::iter::repeat_n(0, padding));
        let m = positions.len();
        let mut row_seq = vec![-7i32; m];
        for &(first, _) in row_tiles {
            row_seq[first] = seq_of_row[first];
        }
        let q_bits = random_bf16(&mut rng, m * 2048, 1.0);
        let q = bits_to_f32(&q_bits);
        let (d_pos, d_seq, d_q) = (
            gpu.upload(&positions).unwrap(),
            gpu.upload(&row_seq).unwrap(),
            gpu.upload(&q_bits).unwrap(),
        );
        d_tiles.write(&gpu, row_tiles).unwrap();
        let rows = Rows {
            positions: &d_pos,
            row_seq: &d_seq,
            block_tables: &d_tables,
            max_blocks,
            m,
        };
        let mut d_out = gpu.upload(&vec![POISON_BF16; m * 2048]).unwrap();
        kernels::prefill_attention(&gpu, &mut d_out, &d_q, &d_k, &d_v, &rows, &d_tiles).unwrap();
        let out = bits_to_f32(&gpu.download(&d_out).unwrap());
        common::assert_all_finite(&out, "prefill attention out");
        let table = |r: usize| &tables[seq_of_row[r] as usize * max_blocks..];
        let cache = (k_all.as_slice(), v_all.as_slice());
        assert_attention_rows(&out, &q, &positions, table, cache, &format!("{pieces:?}"));
    }
}

/// Decode attention prepares each row's queries from the qkv product, writes exactly the rows'
/// new K/V into the cache and attends to them (every row a different sequence).
#[test]
fn gpu_decode_attention_prepares_queries_and_writes_the_new_rows() {
    let Some(gpu) =
        common::gpu_or_skip("gpu_decode_attention_prepares_queries_and_writes_the_new_rows")
    else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_decode_attention");
    let config = ModelConfig::qwen3_0_6b();
    let max_blocks = 80;
    let (tables, k_bits, v_bits) = random_paged_cache(&mut rng, 5, max_blocks);
    let positions: Vec<i32> = vec![0, 16, 300, 1279, -1]; // the last row is padding
    let row_seq: Vec<i32> = vec![3, 0, 4, 1, 2];
    let m = positions.len();
    let qkv: Vec<f32> = (0..m * kernels::QKV_WIDTH)
        .map(|_| rng.centered(2.0))
        .collect();
    let norm_bits: Vec<u16> = (0..2 * 128)
        .map(|_| bf16::from_f32(rng.range(0.5, 3.0)).to_bits())
        .collect();
    let norm_f32 = bits_to_f32(&norm_bits);
    let (d_pos, d_seq, d_tables) = (
        gpu.upload(&positions).unwrap(),
        gpu.upload(&row_seq).unwrap(),
        gpu.upload(&tables).unwrap(),
    );
    let rows = Rows {
        positions: &d_pos,
        row_seq: &d_seq,
        block_tables: &d_tables,
        max_blocks,
        m,
    };
    let round = |v: f32| bf16::from_f32(v).to_f32();
    let close = |got: u16, want: f32, what: &str| {
        let got = bf16::from_bits(got).to_f32();
        assert!(
            (got - want).abs() <= want.abs() * 2f32.powi(-7) + 1e-3,
            "{what}: {got} vs {want}"
        );
    };
    for splits in [1, 3, 20] {
        let mut d_k = gpu.upload(&k_bits).unwrap();
        let mut d_v = gpu.upload(&v_bits).unwrap();
        let mut d_out = gpu.upload(&vec![POISON_BF16; m * 2048]).unwrap();
        let mut d_partials = gpu
            .upload(&vec![f32::NAN; m * 16 * splits * kernels::PARTIAL_FLOATS])
            .unwrap();
        let mut d_counters = gpu.alloc::<i32>(m * 8).unwrap();
        kernels::decode_attention(
            &gpu,
            &mut d_out,
            &mut d_partials,
            &mut d_counters,
            LayerCache {
                k: &mut d_k,
                v: &mut d_v,
            },
            &gpu.upload(&qkv).unwrap(),
            &gpu.upload(&norm_bits[..128]).unwrap(),
            &gpu.upload(&norm_bits[128..]).unwrap(),
            &gpu.upload(&rope_inv_freq(&config)).unwrap(),
            &rows,
            splits,
            config.rms_eps,
        )
        .unwrap();
        let (k, v) = (gpu.download(&d_k).unwrap(), gpu.download(&d_v).unwrap());
        let out = bits_to_f32(&gpu.download(&d_out).unwrap());
        assert!(
            gpu.download(&d_counters).unwrap().iter().all(|&c| c == 0),
            "completion counters must return to zero"
        );
        let mut new_slots = Vec::new();
        // The CPU attends to what the GPU wrote (its bf16 rounding of the new row may differ by
        // an ulp), with the queries prepared and rounded as the kernel stores them.
        let mut q = vec![0.0f32; m * 2048];
        for r in 0..m {
            if positions[r] < 0 {
                continue;
            }
            let (pos, table) = (
                positions[r] as usize,
                &tables[row_seq[r] as usize * max_blocks..],
            );
            let row = &qkv[r * kernels::QKV_WIDTH..(r + 1) * kernels::QKV_WIDTH];
            let prepared = |head: usize, norm: &[f32]| {
                let mut x = rms_norm(&row[head * 128..(head + 1) * 128], norm, config.rms_eps);
                rope(&mut x, pos, config.rope_theta);
                x
            };
            for j in 0..8 {
                let slot = ((table[pos / 16] as usize * 8 + j) * 16 + pos % 16) * 128;
                new_slots.push(slot);
                let want_k = prepared(16 + j, &norm_f32[128..]);
                for d in 0..128 {
                    close(
                        k[slot + d],
                        want_k[d],
                        &format!("row {r} k head {j} dim {d}"),
                    );
                    close(
                        v[slot + d],
                        row[3072 + j * 128 + d],
                        &format!("row {r} v head {j} dim {d}"),
                    );
                }
            }
            for (i, value) in (0..16)
                .flat_map(|h| prepared(h, &norm_f32[..128]))
                .enumerate()
            {
                q[r * 2048 + i] = round(value);
            }
        }
        common::assert_all_finite(&out, "decode attention out");
        let (k_all, v_all) = (bits_to_f32(&k), bits_to_f32(&v));
        assert_attention_rows(
            &out,
            &q,
            &positions,
            |r| &tables[row_seq[r] as usize * max_blocks..],
            (&k_all, &v_all),
            &format!("{splits} splits"),
        );
        for (i, (&got, &before)) in k.iter().zip(&k_bits).enumerate() {
            if got != before || v[i] != v_bits[i] {
                assert!(
                    new_slots.iter().any(|&s| (s..s + 128).contains(&i)),
                    "cache element {i} changed outside the rows' new positions"
                );
            }
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
