//! refresh-worker (spoke): `AsgRefreshRequested` -> instance refresh; refresh events -> `AsgRefreshFinished`.
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Its own settings are checked before anything touches AWS.
    let defer = runtime::config::seconds_var("AMIFLOW_DEFER_SECONDS", 60.0)?;
    // Polling a running refresh is the fallback for lost instance-refresh events: every five
    // deferral periods unless set.
    let poll = runtime::config::seconds_var("AMIFLOW_POLL_SECONDS", defer.as_secs_f64() * 5.0)?;
    // `process`: this process is the account's only refresh-worker, so its ledger of slots is
    // exact between reads of AWS's marks. `account`: others start refreshes too (Lambda runs two
    // invocations at once), so every start is confirmed by a read made just before it, and marks
    // are written at once rather than batched.
    let lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let shared = match std::env::var("AMIFLOW_ADMISSION").ok().as_deref() {
        None | Some("") => lambda,
        Some("account") => true,
        Some("process") => false,
        Some(other) => anyhow::bail!(
            "AMIFLOW_ADMISSION is {other:?}: set it to `process` (one refresh-worker per account) or `account` (several, as under Lambda)"
        ),
    };
    let (_, ctx, worker) = rollout::workers::start("refresh-worker").await?;
    let settings = rollout::refresh::RefreshSettings {
        defer,
        poll,
        confirm_start: shared,
    };
    // Start marks written within half a second of each other share one call; a close (its slot
    // already free) waits up to two seconds, and goes out sooner with the next start mark.
    let tag_batch = if shared {
        rollout::aws::TagBatch::new(Duration::ZERO, Duration::ZERO)
    } else {
        rollout::aws::TagBatch::new(Duration::from_millis(500), Duration::from_secs(2))
    };
    let step = rollout::workers::RefreshStep::new(ctx, settings, &tag_batch);
    worker
        .serve(Arc::new(step), runtime::shutdown::signal())
        .await
}
