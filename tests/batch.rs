//! Batched generation (continuous batching) on the CPU: each request's tokens are those it gets
//! generated alone, whatever the slots and the order requests finish in; end tokens, budgets
//! and KV room are honoured; bad requests fail before anything runs.

mod common;

use anyhow::{ensure, Result};
use braidinfer::batch::{
    generate_batch, BatchDecoder, BatchEvent, CpuBatch, Request, SequenceStart,
};
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

/// A decoder whose slots emit `100 * request + step`, whose KV room holds `room` positions,
/// and whose start call number `failing_call` (counting from 1) fails.
struct Fake {
    room: usize,
    live: Vec<Option<(u32, u32, usize)>>, // (request, step, positions)
    most_live: usize,
    start_calls: usize,
    failing_call: Option<usize>,
}

impl Fake {
    fn new(room: usize, slots: usize, failing_call: Option<usize>) -> Self {
        Self {
            room,
            live: vec![None; slots],
            most_live: 0,
            start_calls: 0,
            failing_call,
        }
    }
}

impl BatchDecoder for Fake {
    fn slots(&self) -> usize {
        self.live.len()
    }
    fn context_limit(&self) -> usize {
        64
    }
    fn has_room(&self, positions: &[usize]) -> bool {
        let used: usize = self.live.iter().flatten().map(|l| l.2).sum();
        used + positions.iter().sum::<usize>() <= self.room
    }
    fn start(&mut self, starts: &[SequenceStart]) -> Result<()> {
        let positions: Vec<usize> = starts
            .iter()
            .map(|s| s.prompt.len() + s.max_new_tokens)
            .collect();
        ensure!(
            self.has_room(&positions),
            "no room for {positions:?} positions"
        );
        ensure!(
            self.failing_call != Some(self.start_calls + 1),
            "start call {} fails",
            self.start_calls + 1
        );
        for (s, &p) in starts.iter().zip(&positions) {
            ensure!(self.live[s.slot].is_none(), "slot {} is busy", s.slot);
            self.live[s.slot] = Some((s.sequence, 0, p));
        }
        self.start_calls += 1;
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
    let mut fake = Fake::new(24, 4, None);
    let (tokens, _) = run(&mut fake, &requests, &[]).unwrap();
    assert_eq!(fake.most_live, 2);
    // Requests 1 and 2 start together; 3, 4 and 5 each when one before them finishes.
    assert_eq!(fake.start_calls, 4);
    for (i, t) in tokens.iter().enumerate() {
        let expected: Vec<u32> = (0..3 + i as u32).map(|s| 100 * i as u32 + s).collect();
        assert_eq!(*t, expected, "request {i}");
    }
    let mut small = Fake::new(8, 4, None);
    let err = run(&mut small, &requests, &[]).unwrap_err();
    assert!(
        format!("{err:#}").contains("request 1: no room for [9] positions"),
        "{err:#}"
    );
    // A failure once requests 1 and 2 run (starting request 3): request 2, still live, is
    // finished, so the slots are free again.
    let mut failing = Fake::new(24, 4, Some(2));
    let err = generate_batch(&mut failing, &requests, &[], |_| Ok(())).unwrap_err();
    assert!(
        format!("{err:#}").contains("request 3: start call 2 fails"),
        "{err:#}"
    );
    assert!(
        failing.live.iter().all(Option::is_none),
        "live sequences left behind"
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

#[test]
fn prefill_passes_pack_prompts_back_to_back_in_tiles_of_one_prompt() {
    use braidinfer::gpu::prefill_plan::{plan, rows, tiles, Piece};
    let piece = |prompt, row, position, len| Piece {
        prompt,
        row,
        position,
        len,
    };
    // One prompt: passes of `chunk` tokens, as a lone prompt always had.
    assert_eq!(
        plan(&[70], 32),
        vec![
            vec![piece(0, 0, 0, 32)],
            vec![piece(0, 0, 32, 32)],
            vec![piece(0, 0, 64, 6)]
        ]
    );
    // Prompts back to back; a long one continues in the next pass.
    let passes = plan(&[23, 100, 3000, 10], 2048);
    assert_eq!(
        passes,
        vec![
            vec![
                piece(0, 0, 0, 23),
                piece(1, 23, 0, 100),
                piece(2, 123, 0, 1925)
            ],
            vec![piece(2, 0, 1925, 1075), piece(3, 1075, 0, 10)],
        ]
    );
    assert_eq!(rows(&passes[1]), 1085);
    // Each piece cut into tiles of 64 rows from its first row.
    let first = tiles(&passes[0]);
    assert_eq!(first[..4], [(0, 23), (23, 64), (87, 36), (123, 64)]);
    assert_eq!((first.len(), first[first.len() - 1]), (34, (2043, 5)));
    // Any mix: every prompt's positions covered once, in order, within the pass; the tiles
    // cover the pass's rows once, in order, each inside one piece.
    let mut rng = common::fresh_rng("prefill_passes_pack_prompts_back_to_back");
    for _ in 0..200 {
        let lens: Vec<usize> = (0..1 + rng.next_u64() % 20)
            .map(|_| 1 + (rng.next_u64() % 300) as usize)
            .collect();
        let chunk = [20, 64, 80, 128, 512][(rng.next_u64() % 5) as usize];
        let mut next_position = vec![0; lens.len()];
        for pass in plan(&lens, chunk) {
            assert!(rows(&pass) <= chunk && !pass.is_empty());
            let mut row = 0;
            for p in &pass {
                assert!(p.len > 0 && p.row == row, "{lens:?} {chunk}");
                assert_eq!(p.position, next_position[p.prompt], "{lens:?} {chunk}");
                next_position[p.prompt] += p.len;
                row += p.len;
            }
            let mut row = 0;
            for (first, len) in tiles(&pass) {
                assert!(first == row && (1..=64).contains(&len));
                let piece = pass
                    .iter()
                    .find(|p| p.row <= first && first < p.row + p.len);
                assert!(first + len <= piece.map_or(0, |p| p.row + p.len));
                row += len;
            }
            assert_eq!(row, rows(&pass));
        }
        assert_eq!(next_position, lens);
    }
}
