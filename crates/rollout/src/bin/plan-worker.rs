//! plan-worker (spoke): `ParamUpdated` / `RolloutWindowOpened` -> one `AsgRefreshRequested` per stale group.
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (_, ctx, worker) = rollout::workers::start("plan-worker").await?;
    worker
        .serve(
            Arc::new(rollout::workers::PlanStep::new(ctx)),
            runtime::shutdown::signal(),
        )
        .await
}
