//! Deterministic random numbers: SplitMix64 for synthetic weights and test inputs, and the
//! counter-based Philox4x32-10 that host and device sampling share (csrc/sampling.cu mirrors it).

/// SplitMix64: a fast seeded stream, good enough for weights and test data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Zero-mean value with standard deviation `std` (uniform distribution: cheap, bounded).
    pub fn centered(&mut self, std: f32) -> f32 {
        self.range(-1.0, 1.0) * std * 3f32.sqrt()
    }
}

/// Philox4x32-10 (Salmon et al., SC'11), returning the first output word.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> u32 {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c[0]
}

/// The uniform in [0, 1) that sampling draws for (`seed`, `sequence`, `step`).
pub fn sampling_uniform(seed: u64, sequence: u32, step: u32) -> f32 {
    let bits = philox4x32([step, sequence, 0, 0], [seed as u32, (seed >> 32) as u32]);
    (bits >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}
