//! How the prompts started together are packed into prefill passes: a pass holds up to `chunk`
//! rows, prompts back to back; a prompt longer than a pass's room goes on in the next pass (its
//! later rows attend to the K/V its earlier ones cached). The prefill attention then runs each
//! prompt's rows of a pass in tiles of up to PREFILL_TILE_ROWS rows (`tiles`), so that no tile
//! mixes sequences.

use super::kernels::PREFILL_TILE_ROWS;

/// Rows [row, row + len) of a pass hold positions [position, position + len) of prompt `prompt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub prompt: usize,
    pub row: usize,
    pub position: usize,
    pub len: usize,
}

/// The passes that prefill prompts of `lens` tokens (every one positive), in order.
pub fn plan(lens: &[usize], chunk: usize) -> Vec<Vec<Piece>> {
    let mut passes = Vec::new();
    let mut pass = Vec::new();
    let mut used = 0; // rows of `pass` taken
    for (prompt, &len) in lens.iter().enumerate() {
        let mut position = 0;
        while position < len {
            if used == chunk {
                passes.push(std::mem::take(&mut pass));
                used = 0;
            }
            let take = (len - position).min(chunk - used);
            pass.push(Piece {
                prompt,
                row: used,
                position,
                len: take,
            });
            position += take;
            used += take;
        }
    }
    if !pass.is_empty() {
        passes.push(pass);
    }
    passes
}

/// Rows a pass runs: through the end of its last piece.
pub fn rows(pass: &[Piece]) -> usize {
    pass.last().map_or(0, |p| p.row + p.len)
}

/// The prefill attention's row tiles of a pass: (first row, rows), each piece cut from its first
/// row into tiles of PREFILL_TILE_ROWS (its last one shorter).
pub fn tiles(pass: &[Piece]) -> Vec<(usize, usize)> {
    pass.iter()
        .flat_map(|p| {
            (0..p.len)
                .step_by(PREFILL_TILE_ROWS)
                .map(move |offset| (p.row + offset, (p.len - offset).min(PREFILL_TILE_ROWS)))
        })
        .collect()
}
