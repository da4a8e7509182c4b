//! Tables for people: condensed borders, as wide as the terminal (or a fixed width when the
//! output is a pipe or a log), long text wrapped at word boundaries, and id columns (group names,
//! AMI ids, rollout ids) never wrapped: an id is copied into the next command, and one broken
//! across two lines cannot be. A table whose ids do not fit is wider than the terminal rather
//! than wrong.

use comfy_table::{
    ColumnConstraint, ContentArrangement, Table, Width, presets::UTF8_FULL_CONDENSED,
};

/// The narrowest a column of text (not ids) is made, in characters.
const MIN_WIDTH: u16 = 12;

/// A table with `header`, whose columns named in `ids` are never wrapped; `fallback` is the
/// width when standard output is no terminal.
pub fn for_people(header: &[&str], ids: &[&str], fallback: u16) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    if table.width().is_none() {
        table.set_width(fallback);
    }
    for (index, name) in header.iter().enumerate() {
        let Some(column) = table.column_mut(index) else {
            continue;
        };
        column.set_constraint(if ids.contains(name) {
            ColumnConstraint::ContentWidth
        } else {
            // Narrow, never a column of single letters: the table grows past the terminal first.
            ColumnConstraint::LowerBoundary(Width::Fixed(MIN_WIDTH))
        });
    }
    table
}

/// Test support: the ids of `ids` that a rendering of `table` at `width` breaks (an id not
/// whole on any one line).
#[cfg(test)]
pub fn broken_ids(table: &mut Table, width: u16, ids: &[&str]) -> Vec<String> {
    table.set_width(width);
    let text = table.to_string();
    ids.iter()
        .filter(|id| !text.lines().any(|line| line.contains(**id)))
        .map(|id| (*id).to_owned())
        .collect()
}
