//! Regenerate `schemas/` from the event types: `cargo run -p events --example gen-schemas`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    std::fs::create_dir_all(&dir)?;
    for (detail_type, schema) in events::schema::all() {
        let path = dir.join(events::schema::file_name(detail_type));
        std::fs::write(&path, events::schema::render(&schema))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
