//! Batched generation (continuous batching) on the CPU: each request's tokens are those it gets
//! generated alone, whatever the slots and the order requests finish in; end tokens, budgets
//! and KV room are honoured; bad requests fail before anything runs.

mod common;

use anyhow::{ensure, Result};
use braidinfer::batch::{generate_batch, BatchDecoder, BatchEvent, CpuBatch, Request};
use braidinfer::generate::{generate, CpuDecoder, GenerationStats};
use braidinfer::reference::CpuModel;
use braidinfer::sampling::SamplingParams;
use braidinfer::synthetic::synthetic_weights;

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed,
    }
}

/// Runs `requests` and returns each one's tokens, checking the events' bookkeeping: one
/// Finished per request, after its last token, with stats that count its tokens.
fn run(
    decoder: &mut dyn BatchDecoder,
    requests: &[Request],
    eos: &[u32],
) -> Result<(Vec<Vec<u32>>, Vec<GenerationStats>)> {
    let mut tokens = vec![Vec::new(); requests.len()];
    let mut finished = vec![false; requests.len()];
    let stats = generate_batch(decoder, requests, eos, |event| {
        match event {
            BatchEvent::Token { request, token } => {
                assert!(
                    !finished[request],
                    "a token after request {request} finished"
                );
                tokens[request].push(token);
            }
            BatchEvent::Finished { request, stats } => {
                assert!(!finished[request], "request {request} finished twice");
                assert_eq!(stats.generated_tokens, tokens[request].len());
                finished[request] = true;
            }
        }
        Ok(())
    })?;
    assert!(finished.iter().all(|&f| f), "every request finishes");
    Ok((tokens, stats))
}

#[test]
fn every_request_gets_the_tokens_it_gets_alone() {
    let config = common::small_config();
    let weights = synthetic_weights(&config, 11);
    let model = CpuModel::new(&config, &weights);
    let mut rng = common::fresh_rng("every_request_gets_the_tokens_it_gets_alone");
    // More requests than slots, of unequal prompts and budgets, greedy and sampled: slots are
    // reused as requests finish at different steps.
    let requests: Vec<Request> = (0..7)
        .map(|i| Request {
            prompt: (0..3 + 5 * i % 11)
                .map(|_| (rng.next_u64() % config.vocab as u64) as u32)
                .collect(),
            max_tokens: 2 + 3 * i % 7,
            params: if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                sampled(rng.next_u64())
            },
        })
        .collect();
    let (tokens, stats) = run(&mut CpuBatch::new(&model, 3), &requests, &[]).unwrap();
    for (i, r) in requests.iter().enumerate() {
        let mut alone = Vec::new();
        let mut decoder = CpuDecoder::for_sequence(&model, r.params, i as u32);
        let alone_stats = generate(&mut decoder, &r.prompt, r.max_tokens, &[], |t| {
            alone.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(tokens[i], alone, "request {i}");
        assert_eq!(stats[i].generated_tokens, r.max_tokens, "request {i}");
        assert_eq!(stats[i].generated_tokens, alone_stats.generated_tokens);
        assert_eq!(stats[i].prompt_tokens, r.prompt.len());
    }
}

#[test]
fn an_end_token_stops_its_request_only() {
    let config = common::small_config();
    let model = CpuModel::new(&config, &synthetic_weights(&config, 12));
    let request = |prompt: Vec<u32>| Request {
        prompt,
        max_tokens: 8,
        params: SamplingParams::greedy(),
    };
    let requests = vec![request(vec![1, 2, 3]), request(vec![9, 8, 7, 6])];
    let (free, _) = run(&mut CpuBatch::new(&model, 2), &requests, &[]).unwrap();
    // The third token of request 0 as the end token, where request 1 does not produce it.
    let eos = free[0][2];
    let stop_in_1 = free[1].iter().position(|&t| t == eos);
    let (tokens, stats) = run(&mut CpuBatch::new(&model, 2), &requests, &[eos]).unwrap();
    let first_eos = free[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(tokens[0], free[0][..=first_eos]);
    assert!(stats[0].stopped_on_eos);
    let expected_1 = stop_in_1.map_or(8, |p| p + 1);
    assert_eq!(tokens[1], free[1][..expected_1]);
    assert_eq!(stats[1].stopped_on_eos, stop_in_1.is_some());
}

/// A decoder whose slots emit `100 * request + step` and whose KV room holds `room` positions.
struct Fake {
    room: usize,
    live: Vec<Option<(u32, u32, usize)>>, // (request, step, positions)
    most_live: usize,
}

impl BatchDecoder for Fake {
    fn slots(&self) -> usize {
        self.live.len()
    }
    fn context_limit(&self) -> usize {
        64
    }
    fn has_room(&self, positions: usize) -> bool {
        let used: usize = self.live.iter().flatten().map(|l| l.2).sum();
        used + positions <= self.room
    }
    fn start(
        &mut self,
        slot: usize,
        prompt: &[u32],
        max_new_tokens: usize,
        _params: &SamplingParams,
        sequence: u32,
    ) -> Result<()> {
        let positions = prompt.len() + max_new_tokens;
        ensure!(
            self.has_room(positions),
            "no room for {positions} positions"
        );
        ensure!(self.live[slot].is_none(), "slot {slot} is busy");
        self.live[slot] = Some((sequence, 0, positions));
        self.most_live = self.most_live.max(self.live.iter().flatten().count());
        Ok(())
    }
    fn finish(&mut self, slot: usize) -> Result<()> {
        self.live[slot] = None;
        Ok(())
    }
    fn step(&mut self) -> Result<()> {
        for l in self.live.iter_mut().flatten() {
            l.1 += 1;
        }
        Ok(())
    }
    fn tokens(&mut self) -> Result<Vec<u32>> {
        Ok(self
            .live
            .iter()
            .map(|l| l.map_or(0, |(r, s, _)| 100 * r + s))
            .collect())
    }
}

#[test]
fn requests_wait_for_kv_room_and_one_that_never_fits_is_an_error() {
    let requests: Vec<Request> = (0..5)
        .map(|i| Request {
            prompt: vec![1; 6],
            max_tokens: 3 + i,
            params: SamplingParams::greedy(),
        })
        .collect();
    // Four slots, but room for two requests of 9-13 positions at a time.
    let mut fake = Fake {
        room: 24,
        live: vec![None; 4],
        most_live: 0,
    };
    let (tokens, _) = run(&mut fake, &requests, &[]).unwrap();
    assert_eq!(fake.most_live, 2);
    for (i, t) in tokens.iter().enumerate() {
        let expected: Vec<u32> = (0..3 + i as u32).map(|s| 100 * i as u32 + s).collect();
        assert_eq!(*t, expected, "request {i}");
    }
    let mut small = Fake {
        room: 8,
        live: vec![None; 4],
        most_live: 0,
    };
    let err = run(&mut small, &requests, &[]).unwrap_err();
    assert!(
        format!("{err:#}").contains("request 1: no room for 9 positions"),
        "{err:#}"
    );
}

#[test]
fn bad_requests_fail_before_anything_runs() {
    let config = common::small_config();
    let model = CpuModel::new(&config, &synthetic_weights(&config, 13));
    let good = Request {
        prompt: vec![5, 6],
        max_tokens: 4,
        params: SamplingParams::greedy(),
    };
    let cases = [
        (
            Request {
                prompt: vec![1; config.max_positions],
                ..good.clone()
            },
            "request 2: the prompt is 512 tokens",
        ),
        (
            Request {
                max_tokens: 0,
                ..good.clone()
            },
            "request 2: max-tokens must be at least 1",
        ),
        (
            Request {
                params: SamplingParams {
                    top_p: 1.5,
                    ..sampled(1)
                },
                ..good.clone()
            },
            "request 2: top-p",
        ),
    ];
    for (bad, message) in cases {
        let mut events = 0;
        let err = generate_batch(
            &mut CpuBatch::new(&model, 2),
            &[good.clone(), bad],
            &[],
            |_| {
                events += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains(message), "{err:#}");
        assert_eq!(events, 0, "{message}: nothing runs before the checks");
    }
}
