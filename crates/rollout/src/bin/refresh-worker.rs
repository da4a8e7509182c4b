//! refresh-worker (spoke): `AsgRefreshRequested` -> instance refresh; refresh events -> `AsgRefreshFinished`.
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (_, ctx, worker) = rollout::workers::start("refresh-worker").await?;
    let defer: f64 = runtime::config::var_or("AMIFLOW_DEFER_SECONDS", 60.0)?;
    // Polling a running refresh is the fallback for lost instance-refresh events: every five
    // deferral periods unless set.
    let poll: f64 = runtime::config::var_or("AMIFLOW_POLL_SECONDS", defer * 5.0)?;
    let step = rollout::workers::RefreshStep {
        ctx,
        settings: rollout::refresh::RefreshSettings {
            defer: Duration::from_secs_f64(defer),
            poll: Duration::from_secs_f64(poll),
        },
        admission: rollout::refresh::Admission::default(),
        // Marks and closes written within this long of each other share one call.
        tag_batch: rollout::aws::TagBatch::new(Duration::from_millis(500)),
    };
    worker
        .serve(Arc::new(step), runtime::shutdown::signal())
        .await
}
