//! The book's pictures that `attn-core` defines: redrawn here from the code, so that the page
//! cannot drift from what the stages do.

use attn_core::{KeyRange, Window};

/// The tile grid of `keys` with square blocks of `block`: `#` whole, `/` cut, `.` skipped.
fn tile_grid(keys: &KeyRange, block: usize) -> String {
    let mut grid = String::new();
    for i0 in (0..keys.n_q).step_by(block) {
        for j0 in (0..keys.n_k).step_by(block) {
            let (rows, cols) = ((i0, i0 + block), (j0, block));
            let state = if keys.tile_hidden(rows, cols) {
                '.'
            } else if keys.tile_cut(rows, cols) {
                '/'
            } else {
                '#'
            };
            grid.push(' ');
            grid.push(state);
        }
        grid.push('\n');
    }
    grid
}

#[test]
fn the_window_tile_grid_in_the_book_is_the_one_the_stages_use() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../book/src/score-modifiers.md"
    ))
    .unwrap();
    let marker = "<!-- tiles: n 32, blocks 4, causal, left 9 -->\n```text\n";
    let start = page.find(marker).expect("the grid's marker") + marker.len();
    let drawn = &page[start..start + page[start..].find("```").unwrap()];
    let keys = KeyRange::new(32, 32, true, Some(Window::new(9, -1)));
    assert_eq!(drawn, tile_grid(&keys, 4));
    // the counts the page quotes: 26 tiles visited, 36 under causal masking alone
    let visited = |g: &str| g.chars().filter(|c| *c == '#' || *c == '/').count();
    assert_eq!(visited(drawn), 26);
    assert_eq!(visited(&tile_grid(&KeyRange::new(32, 32, true, None), 4)), 36);
}
