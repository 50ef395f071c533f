//! The GPU engine end to end on a synthetic model with the real per-layer shapes (2 layers):
//! logits against the CPU reference, graph replay against kernel-by-kernel launches, batched
//! generation, a long generation, and the context and KV-capacity limits.

mod common;

use braidinfer::batch::{generate_batch, BatchEvent, Request, SequenceStart};
use braidinfer::compare::rel_l2;
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kv_cache::bytes_per_position;
use braidinfer::gpu::{Engine, EngineOptions, Gpu};
use braidinfer::quant::Quant;
use braidinfer::reference::CpuModel;
use braidinfer::rng::SplitMix64;
use braidinfer::sampling::{argmax, top_k, SamplingParams};
use braidinfer::synthetic::synthetic_weights;
use braidinfer::weights::ModelWeights;

fn small_real_config() -> ModelConfig {
    ModelConfig {
        layers: 2,
        ..ModelConfig::qwen3_0_6b()
    }
}

/// The same with a 4,096-token vocabulary: the CPU oracle stays quick over many positions.
fn small_vocab_config() -> ModelConfig {
    ModelConfig {
        vocab: 4096,
        ..small_real_config()
    }
}

fn engine(
    gpu: Gpu,
    config: &ModelConfig,
    weights: &ModelWeights,
    options: EngineOptions,
) -> Engine {
    Engine::new(gpu, config, weights, &options).expect("building the engine")
}

fn random_prompt(rng: &mut SplitMix64, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// The oracles of an engine holding `quant` weights: the CPU model with activations rounded to
/// bf16 where the kernels store them, and the all-f32 CPU model (both through the same INT8
/// round trip of the weights for `Quant::Int8`).
fn oracles(config: &ModelConfig, weights: &ModelWeights, quant: Quant) -> (CpuModel, CpuModel) {
    (
        CpuModel::new(config, weights)
            .with_bf16_activations()
            .with_weights(quant),
        CpuModel::new(config, weights).with_weights(quant),
    )
}

/// True when the reference's two best logits are too close for bf16 math to order reliably.
fn near_tie(logits: &[f32]) -> bool {
    let best = top_k(logits, 2);
    best[0].1 - best[1].1 < 0.05
}

#[test]
fn gpu_engine_matches_the_cpu_reference() {
    // Three prefill chunks; decode with one attention range per row.
    matches_the_cpu_reference(
        "gpu_engine_matches_the_cpu_reference",
        small_real_config(),
        (70, 32, 30),
        Quant::Bf16,
    );
}

#[test]
fn gpu_int8_engine_matches_the_int8_cpu_reference() {
    // INT8 weights everywhere: prefill chunks of 80 (the tiled product) and 20 (skinny), decode
    // on the fused layer kernel and the INT8 LM head.
    matches_the_cpu_reference(
        "gpu_int8_engine_matches_the_int8_cpu_reference",
        small_real_config(),
        (100, 80, 30),
        Quant::Int8,
    );
}

#[test]
fn gpu_engine_matches_the_cpu_reference_at_long_context() {
    // Past 1,024 positions the fused layer merges more than 8 attention ranges per row (in
    // batches, rescaling the running sums). A small vocabulary keeps the CPU reference quick.
    let config = small_vocab_config();
    matches_the_cpu_reference(
        "gpu_engine_matches_the_cpu_reference_at_long_context",
        config,
        (1100, 512, 6),
        Quant::Bf16,
    );
}

/// Prefill of a random prompt in `chunk`-token passes, then `steps` greedy decode steps, each
/// position's logits against the CPU oracle.
fn matches_the_cpu_reference(
    name: &str,
    config: ModelConfig,
    (prompt_len, chunk, steps): (usize, usize, usize),
    quant: Quant,
) {
    let Some(gpu) = common::gpu_or_skip(name) else {
        return;
    };
    let mut rng = common::fresh_rng(name);
    let weights = synthetic_weights(&config, rng.next_u64());
    // The oracle rounds activations to bf16 where the kernels store them, so what remains is
    // summation order (and the rare bf16 rounding flip it causes).
    let (cpu, f32_cpu) = oracles(&config, &weights, quant);
    let mut engine = engine(
        gpu,
        &config,
        &weights,
        EngineOptions {
            prefill_chunk: chunk,
            quant,
            ..Default::default()
        },
    );
    let prompt = random_prompt(&mut rng, prompt_len, config.vocab);
    let prompt_logits = engine
        .start_sequence(0, &prompt, steps + 10, &SamplingParams::greedy(), 0, true)
        .unwrap()
        .unwrap();
    let (mut cache, mut f32_cache) = (cpu.new_cache(), f32_cpu.new_cache());
    // Per position: the GPU's error against f32, and the bf16-activation oracle's own error.
    let mut errors = Errors::default();
    let mut reference = Vec::new();
    for (i, &token) in prompt.iter().enumerate() {
        reference = cpu.forward(token, &mut cache).unwrap();
        let ours = &prompt_logits[i * config.vocab..(i + 1) * config.vocab];
        common::assert_all_finite(ours, "prefill logits");
        errors.add(
            ours,
            &reference,
            &f32_cpu.forward(token, &mut f32_cache).unwrap(),
        );
    }
    let mut mismatches = 0;
    for step in 0..steps {
        let token = engine.gpu().download(engine.tokens()).unwrap()[0] as u32;
        if !near_tie(&reference) {
            assert_eq!(
                token,
                argmax(&reference),
                "step {step}: greedy token differs from the reference's argmax"
            );
        } else if token != argmax(&reference) {
            mismatches += 1;
        }
        engine.step_eager().unwrap();
        let ours = engine.gpu().download(engine.logits()).unwrap();
        common::assert_all_finite(&ours[..config.vocab], "decode logits");
        reference = cpu.forward(token, &mut cache).unwrap();
        errors.add(
            &ours[..config.vocab],
            &reference,
            &f32_cpu.forward(token, &mut f32_cache).unwrap(),
        );
    }
    eprintln!(
        "{quant}: worst relative L2 error of logits against f32: GPU {:.2e}, bf16-activation reference {:.2e}; \
         GPU against that reference {:.2e}; near-tie greedy mismatches: {mismatches}",
        errors.gpu_vs_f32, errors.oracle_vs_f32, errors.gpu_vs_oracle
    );
    errors.assert_within_the_oracle_bound();
}

#[test]
fn gpu_packed_prefill_and_batched_decode_match_the_cpu_reference_in_every_slot() {
    packed_prefill_and_batched_decode_match_the_cpu_reference(
        "gpu_packed_prefill_and_batched_decode_match_the_cpu_reference_in_every_slot",
        Quant::Bf16,
    );
}

#[test]
fn gpu_int8_packed_prefill_and_batched_decode_match_the_int8_cpu_reference() {
    packed_prefill_and_batched_decode_match_the_cpu_reference(
        "gpu_int8_packed_prefill_and_batched_decode_match_the_int8_cpu_reference",
        Quant::Int8,
    );
}

fn packed_prefill_and_batched_decode_match_the_cpu_reference(name: &str, quant: Quant) {
    let Some(gpu) = common::gpu_or_skip(name) else {
        return;
    };
    let mut rng = common::fresh_rng(name);
    let config = small_vocab_config();
    let v = config.vocab;
    let weights = synthetic_weights(&config, rng.next_u64());
    let (cpu, f32_cpu) = oracles(&config, &weights, quant);
    let mut engine = engine(
        gpu,
        &config,
        &weights,
        EngineOptions {
            max_batch: 70,
            prefill_chunk: 256,
            quant,
            ..Default::default()
        },
    );
    engine.capture().unwrap();
    // Sequences of different lengths in slots 0, 3, 17, 40 and 69, started together: their
    // prompts packed back to back into prefill passes of 256 rows (pass 1: slot 0's 37 rows and
    // slot 3's first 219; pass 2: slot 3's last 81, then slots 17, 40 and 69: row tiles of the
    // prefill attention starting at rows that are not multiples of 64). While slot 69 lives a
    // step is
    // a batch of 70 (one chain of separate kernels: tiled products, k split over clusters, q/k
    // norm + RoPE before attention; 65 padding rows); once it finishes, a batch of 64 (two
    // concurrent chains of 32 rows, their products tiled beside each other); once slot 40
    // finishes, a batch of 32 (two chains of 16 rows: skinny products, attention preparing its
    // own queries); once slot 17 finishes too, a batch of 4 (the fused layer kernel), and the
    // others go on.
    struct Sequence {
        slot: usize,
        cache: braidinfer::reference::CpuCache,
        f32_cache: braidinfer::reference::CpuCache,
        reference: Vec<f32>,
    }
    let prompts: Vec<(usize, Vec<u32>)> = [(0, 37), (3, 300), (17, 5), (40, 9), (69, 5)]
        .into_iter()
        .map(|(slot, len)| (slot, random_prompt(&mut rng, len, v)))
        .collect();
    let starts: Vec<SequenceStart> = prompts
        .iter()
        .map(|(slot, prompt)| SequenceStart {
            slot: *slot,
            prompt,
            max_new_tokens: 40,
            params: SamplingParams::greedy(),
            sequence: *slot as u32,
        })
        .collect();
    engine.start_sequences(&starts).unwrap();
    let prompt_logits = engine.gpu().download(engine.logits()).unwrap();
    let mut errors = Errors::default();
    let mut sequences: Vec<Sequence> = prompts
        .iter()
        .map(|(slot, prompt)| {
            let (mut cache, mut f32_cache) = (cpu.new_cache(), f32_cpu.new_cache());
            let (mut reference, mut f32_reference) = (Vec::new(), Vec::new());
            for &token in prompt {
                reference = cpu.forward(token, &mut cache).unwrap();
                f32_reference = f32_cpu.forward(token, &mut f32_cache).unwrap();
            }
            let ours = &prompt_logits[slot * v..(slot + 1) * v];
            common::assert_all_finite(ours, "packed prefill logits");
            errors.add(ours, &reference, &f32_reference);
            Sequence {
                slot: *slot,
                cache,
                f32_cache,
                reference,
            }
        })
        .collect();
    for step in 0..12 {
        for (at, slot) in [(3, 69), (6, 40), (9, 17)] {
            if step == at {
                engine.finish_sequence(slot).unwrap();
                sequences.retain(|s| s.slot != slot);
            }
        }
        let rows = match step {
            0..3 => 70,
            3..6 => 64,
            6..9 => 32,
            _ => 4,
        };
        assert_eq!(engine.step_rows(), rows, "step {step}");
        let tokens = engine.gpu().download(engine.tokens()).unwrap();
        engine.step().unwrap();
        let logits = engine.gpu().download(engine.logits()).unwrap();
        for s in &mut sequences {
            let token = tokens[s.slot] as u32;
            if !near_tie(&s.reference) {
                assert_eq!(
                    token,
                    argmax(&s.reference),
                    "step {step}, slot {}: greedy token",
                    s.slot
                );
            }
            s.reference = cpu.forward(token, &mut s.cache).unwrap();
            let ours = &logits[s.slot * v..(s.slot + 1) * v];
            common::assert_all_finite(ours, "batched decode logits");
            errors.add(
                ours,
                &s.reference,
                &f32_cpu.forward(token, &mut s.f32_cache).unwrap(),
            );
        }
    }
    eprintln!(
        "packed prefill and batched decode ({quant}), worst relative L2 error against f32: GPU {:.2e}, bf16-activation reference {:.2e}",
        errors.gpu_vs_f32, errors.oracle_vs_f32
    );
    errors.assert_within_the_oracle_bound();
}

#[test]
fn gpu_batch_invariant_decode_is_bit_identical_in_every_batch_and_slot() {
    let name = "gpu_batch_invariant_decode_is_bit_identical_in_every_batch_and_slot";
    for quant in [Quant::Bf16, Quant::Int8] {
        let Some(gpu) = common::gpu_or_skip(name) else {
            return;
        };
        let mut rng = common::fresh_rng(name);
        let config = small_vocab_config();
        let weights = synthetic_weights(&config, rng.next_u64());
        let mut engine = engine(
            gpu,
            &config,
            &weights,
            EngineOptions {
                max_batch: 40,
                prefill_chunk: 64,
                quant,
                batch_invariant: true,
                ..Default::default()
            },
        );
        engine.capture().unwrap();
        let prompt = random_prompt(&mut rng, 50, config.vocab);
        let others: Vec<Vec<u32>> = (0..40)
            .map(|i| random_prompt(&mut rng, 5 + 7 * i % 80, config.vocab))
            .collect();
        // The sequence's logits over 8 greedy steps in `slot`, beside sequences in `beside`.
        let mut decode = |slot: usize, beside: &[usize], rows: usize| -> Vec<u32> {
            for s in 0..40 {
                engine.finish_sequence(s).unwrap();
            }
            let greedy = SamplingParams::greedy();
            for &s in beside {
                engine
                    .start_sequence(s, &others[s], 10, &greedy, s as u32, false)
                    .unwrap();
            }
            engine
                .start_sequence(slot, &prompt, 10, &greedy, 99, false)
                .unwrap();
            assert_eq!(engine.step_rows(), rows, "{quant}: slot {slot}");
            let mut bits = Vec::new();
            for _ in 0..8 {
                engine.step().unwrap();
                let logits = engine.gpu().download(engine.logits()).unwrap();
                let ours = &logits[slot * config.vocab..(slot + 1) * config.vocab];
                common::assert_all_finite(ours, "batch-invariant logits");
                bits.extend(ours.iter().map(|v| v.to_bits()));
            }
            bits
        };
        let alone = decode(0, &[], 1);
        let in_four = decode(2, &[0, 1], 4);
        let all_slots: Vec<usize> = (0..39).collect();
        let in_forty = decode(39, &all_slots, 40);
        let in_sixteen = decode(9, &[0, 3, 15], 16);
        for (what, bits) in [
            ("slot 2 of a batch of 3 (bucket 4)", &in_four),
            ("slot 39 of 40 (three fused chunks)", &in_forty),
            ("slot 9 of a batch of 4 (bucket 16)", &in_sixteen),
        ] {
            let differing = alone.iter().zip(bits).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing,
                0,
                "{quant}: {what}: {differing} of {} logits differ from the sequence decoded alone",
                alone.len()
            );
        }
    }
}

#[test]
fn gpu_batched_generation_gives_each_request_its_tokens_alone() {
    let name = "gpu_batched_generation_gives_each_request_its_tokens_alone";
    let Some(gpu) = common::gpu_or_skip(name) else {
        return;
    };
    let mut rng = common::fresh_rng(name);
    let config = small_vocab_config();
    let weights = synthetic_weights(&config, rng.next_u64());
    // Batch-invariant, so a request's greedy tokens never depend on its batch or slot; four
    // slots, and KV room (14 blocks of 16 positions) for two or three of these requests (up to
    // 6 blocks each) at a time, so requests also wait for room.
    let mut engine = engine(
        gpu,
        &config,
        &weights,
        EngineOptions {
            max_batch: 4,
            prefill_chunk: 64,
            batch_invariant: true,
            kv_cache_bytes: Some(14 * 16 * bytes_per_position(config.layers)),
            ..Default::default()
        },
    );
    engine.capture().unwrap();
    let requests: Vec<Request> = (0..9)
        .map(|i| Request {
            prompt: random_prompt(&mut rng, 5 + 13 * i % 60, config.vocab),
            max_tokens: 4 + 5 * i % 17,
            params: SamplingParams::greedy(),
        })
        .collect();
    let mut generate = |requests: &[Request]| -> Vec<Vec<u32>> {
        let mut tokens = vec![Vec::new(); requests.len()];
        generate_batch(&mut engine, requests, &[], |event| {
            if let BatchEvent::Token { request, token } = event {
                tokens[request].push(token);
            }
            Ok(())
        })
        .unwrap();
        tokens
    };
    let together = generate(&requests);
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(together[i].len(), r.max_tokens, "request {i}");
        let alone = generate(std::slice::from_ref(r));
        assert_eq!(together[i], alone[0], "request {i}: batched against alone");
    }
}

#[test]
fn gpu_engine_takes_any_batch_size() {
    // Batches that are not powers of two run buckets whose attention ranges per row differ
    // from their own (a batch of 3 has 5 per row, its bucket of 1 16): the partials must hold
    // the largest.
    let name = "gpu_engine_takes_any_batch_size";
    let mut rng = common::fresh_rng(name);
    let config = small_vocab_config();
    let weights = synthetic_weights(&config, rng.next_u64());
    for max_batch in [3, 5, 12, 33] {
        let Some(gpu) = common::gpu_or_skip(name) else {
            return;
        };
        let mut engine = engine(
            gpu,
            &config,
            &weights,
            EngineOptions {
                max_batch,
                prefill_chunk: 64,
                ..Default::default()
            },
        );
        engine.capture().unwrap();
        for slot in [0, max_batch - 1] {
            let prompt = random_prompt(&mut rng, 20, config.vocab);
            engine
                .start_sequence(slot, &prompt, 8, &SamplingParams::greedy(), 0, false)
                .unwrap();
        }
        for _ in 0..3 {
            engine.step().unwrap();
        }
        let logits = engine.gpu().download(engine.logits()).unwrap();
        for slot in [0, max_batch - 1] {
            common::assert_all_finite(
                &logits[slot * config.vocab..(slot + 1) * config.vocab],
                "logits",
            );
        }
    }
}

#[derive(Default)]
struct Errors {
    gpu_vs_f32: f64,
    oracle_vs_f32: f64,
    gpu_vs_oracle: f64,
}

impl Errors {
    fn add(&mut self, gpu: &[f32], oracle: &[f32], f32_reference: &[f32]) {
        self.gpu_vs_f32 = self.gpu_vs_f32.max(rel_l2(gpu, f32_reference));
        self.oracle_vs_f32 = self.oracle_vs_f32.max(rel_l2(oracle, f32_reference));
        self.gpu_vs_oracle = self.gpu_vs_oracle.max(rel_l2(gpu, oracle));
    }

    /// Same rounding points as the oracle, other summation orders: no worse than 1.5x the error
    /// that bf16 activations cause by themselves (the bar the transformers parity check uses).
    fn assert_within_the_oracle_bound(&self) {
        assert!(
            self.gpu_vs_f32 <= 1.5 * self.oracle_vs_f32,
            "GPU error {:.2e} against f32 exceeds 1.5x the bf16-activation reference's {:.2e}",
            self.gpu_vs_f32,
            self.oracle_vs_f32
        );
    }
}

#[test]
fn gpu_graph_replay_is_bit_identical_to_eager_launches() {
    let Some(gpu) = common::gpu_or_skip("gpu_graph_replay_is_bit_identical_to_eager_launches")
    else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_graph_replay");
    let config = small_real_config();
    let weights = synthetic_weights(&config, 11);
    let mut engine = engine(gpu, &config, &weights, EngineOptions::default());
    let prompt = random_prompt(&mut rng, 50, config.vocab);
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        seed: 5,
    };
    let run = |engine: &mut Engine, graph: bool| -> Vec<Vec<f32>> {
        engine
            .start_sequence(0, &prompt, 64, &params, 0, false)
            .unwrap();
        (0..24)
            .map(|_| {
                if graph {
                    engine.step().unwrap()
                } else {
                    engine.step_eager().unwrap()
                }
                engine.gpu().download(engine.logits()).unwrap()
            })
            .collect()
    };
    let eager = run(&mut engine, false);
    let nodes = engine.capture().unwrap();
    eprintln!("decode graph kernel nodes (batch, nodes): {nodes:?}");
    let replayed = run(&mut engine, true);
    for (step, (a, b)) in eager.iter().zip(&replayed).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "step {step}: graph logits differ from eager"
        );
    }
}

#[test]
fn gpu_long_generation_stays_finite_without_memory_growth() {
    let Some(gpu) = common::gpu_or_skip("gpu_long_generation_stays_finite_without_memory_growth")
    else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_long_generation");
    let config = small_real_config();
    let weights = synthetic_weights(&config, 3);
    let ctx = gpu.ctx.clone();
    let mut engine = engine(gpu, &config, &weights, EngineOptions::default());
    engine.capture().unwrap();
    let prompt = random_prompt(&mut rng, 20, config.vocab);
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 64,
        top_p: 1.0,
        seed: 9,
    };
    engine
        .start_sequence(0, &prompt, 1000, &params, 0, false)
        .unwrap();
    engine.gpu().synchronize().unwrap();
    let free_before = ctx.mem_get_info().unwrap().0;
    for step in 1..1000 {
        engine.step().unwrap();
        if step % 100 == 0 {
            let logits = engine.gpu().download(engine.logits()).unwrap();
            common::assert_all_finite(&logits[..config.vocab], "logits");
            let token = engine.gpu().download(engine.tokens()).unwrap()[0];
            assert!(
                (0..config.vocab as i32).contains(&token),
                "step {step}: token {token}"
            );
        }
    }
    engine.gpu().synchronize().unwrap();
    assert_eq!(
        ctx.mem_get_info().unwrap().0,
        free_before,
        "GPU memory changed during decoding"
    );
}

#[test]
fn gpu_context_and_capacity_limits_are_clear_errors() {
    let Some(gpu) = common::gpu_or_skip("gpu_context_and_capacity_limits_are_clear_errors") else {
        return;
    };
    let mut rng = common::fresh_rng("gpu_limits");
    let config = small_real_config();
    let weights = synthetic_weights(&config, 5);
    let per_position = braidinfer::gpu::kv_cache::bytes_per_position(config.layers);
    let options = EngineOptions {
        max_batch: 2,
        kv_cache_bytes: Some(256 * per_position),
        prefill_chunk: 128,
        quant: Quant::Bf16,
        batch_invariant: false,
    };
    let mut engine = engine(gpu, &config, &weights, options);
    engine.capture().unwrap();
    assert_eq!(engine.context_limit(), 256);
    let greedy = SamplingParams::greedy();

    // A prompt near the limit works and decodes up to it.
    let near = random_prompt(&mut rng, 250, config.vocab);
    engine
        .start_sequence(0, &near, 6, &greedy, 0, false)
        .unwrap();
    for _ in 0..5 {
        engine.step().unwrap();
    }
    let logits = engine.gpu().download(engine.logits()).unwrap();
    common::assert_all_finite(&logits[..config.vocab], "logits at the context limit");

    // Over the limit: refused, with the numbers.
    let err = format!(
        "{:#}",
        engine
            .start_sequence(
                1,
                &random_prompt(&mut rng, 256, config.vocab),
                1,
                &greedy,
                1,
                false
            )
            .unwrap_err()
    );
    assert!(err.contains("context limit of 256"), "{err}");

    // More than the cache holds: slot 0 keeps its 256 positions, so slot 1 cannot get 100.
    let err = format!(
        "{:#}",
        engine
            .start_sequence(
                1,
                &random_prompt(&mut rng, 90, config.vocab),
                10,
                &greedy,
                1,
                false
            )
            .unwrap_err()
    );
    assert!(err.contains("KV cache cannot hold"), "{err}");
    engine.finish_sequence(0).unwrap();
    engine
        .start_sequence(
            1,
            &random_prompt(&mut rng, 90, config.vocab),
            10,
            &greedy,
            1,
            false,
        )
        .unwrap();

    let err = format!(
        "{:#}",
        engine
            .start_sequence(0, &[config.vocab as u32], 1, &greedy, 0, false)
            .unwrap_err()
    );
    assert!(err.contains("outside the vocabulary"), "{err}");
}
