//! Symmetric per-output-channel INT8 weights: row r of a [rows, cols] matrix is stored as int8
//! values q and one f32 scale s = absmax(row) / 127, so that w ~ q * s with |w - q * s| <= s / 2.
//! A zero row gets scale 0 (and zero values): nothing divides by zero.

use std::fmt;

/// How the engine holds the linear layers' weights (and the LM head) on the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    #[default]
    Bf16,
    /// Symmetric per-output-channel INT8, quantized on the GPU at load.
    Int8,
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quant::Bf16 => "bf16",
            Quant::Int8 => "int8",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<i8>,  // [rows, cols]
    pub scales: Vec<f32>, // [rows]
}

impl Int8Matrix {
    /// Quantizes `w` [rows, cols] (row-major) row by row, rounding to nearest.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "a [{rows}, {cols}] matrix");
        let mut values = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(rows);
        for row in w.chunks(cols.max(1)).take(rows) {
            let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = absmax / 127.0;
            scales.push(scale);
            values.extend(row.iter().map(|&v| {
                if scale == 0.0 {
                    0
                } else {
                    (v / scale).round().clamp(-127.0, 127.0) as i8
                }
            }));
        }
        Self {
            rows,
            cols,
            values,
            scales,
        }
    }

    /// The weights the INT8 values stand for: q * scale, row by row.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values
            .chunks(self.cols.max(1))
            .zip(&self.scales)
            .flat_map(|(row, &scale)| row.iter().map(move |&q| q as f32 * scale))
            .collect()
    }

    /// Bytes on a device: one per value, four per scale.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }
}

/// `w` [rows, cols] after an INT8 round trip: what an INT8 product computes with these weights.
pub fn int8_round_trip(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    Int8Matrix::quantize(w, rows, cols).dequantize()
}
