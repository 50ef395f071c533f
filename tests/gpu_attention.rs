//! Attention against the CPU reference on fresh random inputs, outputs poisoned before each
//! launch: q/k norm + RoPE with the paged KV-cache write, decode attention (split along the
//! sequence, and with its queries prepared from the qkv product) and prefill attention. Skips
//! with a visible line where there is no GPU (fails instead under gpu-test.sh).

mod common;

use braidinfer::compare::rel_l2;
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kernels::{self, LayerCache, Rows};
use braidinfer::gpu::weights::rope_inv_freq;
use braidinfer::reference::{attention, rms_norm, rope};
use braidinfer::rng::SplitMix64;
use half::bf16;

use common::{bits_to_f32, random_bf16, POISON_BF16};

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
