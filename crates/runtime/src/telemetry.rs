//! JSON logs, one object per line, filtered by `RUST_LOG` (default `info`). A line written while a
//! message is handled carries the message's span (`span.worker`, `span.rollout_id`, `span.key`,
//! `span.account`, `span.detail_type`).

use tracing_subscriber::EnvFilter;

/// Install the JSON subscriber. Safe to call twice (the second call does nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
