//! The tensor-core products (skinny and tiled, bf16 and INT8 weights, RMSNorm fused) and the
//! INT8 quantizer against the CPU on fresh random inputs, outputs poisoned before each launch.
//! Skips with a visible line where there is no GPU (fails instead under gpu-test.sh).

mod common;

use braidinfer::compare::rel_l2;
use braidinfer::gpu::kernels::{self, Epilogue, Matrix, Placement};
use braidinfer::gpu::Gpu;
use braidinfer::quant::Int8Matrix;
use braidinfer::reference::{rms_norm, silu};
use braidinfer::rng::SplitMix64;
use half::bf16;

use common::{bits_to_f32, random_bf16, POISON_BF16};

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
