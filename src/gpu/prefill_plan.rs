//! How the prompts started together are packed into prefill passes: a pass holds up to `chunk`
//! rows, each prompt's piece starts at a multiple of `tile` rows (so that the prefill attention
//! kernel's tiles never mix sequences; the rows between pieces are padding), and a prompt longer
//! than a pass's room goes on in the next pass (its later rows attend to the K/V its earlier
//! ones cached).

/// Rows [row, row + len) of a pass hold positions [position, position + len) of prompt `prompt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub prompt: usize,
    pub row: usize,
    pub position: usize,
    pub len: usize,
}

/// The passes that prefill prompts of `lens` tokens (every one positive), in order.
pub fn plan(lens: &[usize], chunk: usize, tile: usize) -> Vec<Vec<Piece>> {
    let mut passes = Vec::new();
    let mut pass = Vec::new();
    let mut used = 0; // rows of `pass` taken, padding included
    for (prompt, &len) in lens.iter().enumerate() {
        let mut position = 0;
        while position < len {
            if used >= chunk {
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
            used = (used + take).next_multiple_of(tile);
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
