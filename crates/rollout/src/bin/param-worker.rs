//! param-worker (spoke): `AmiShared` -> golden parameter written and read back -> `ParamUpdated`.
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Its own settings are checked before anything touches AWS.
    let interval = runtime::config::seconds_var("AMIFLOW_READ_BACK_SECONDS", 2.0)?;
    let (_, ctx, worker) = rollout::workers::start("param-worker").await?;
    let step = rollout::workers::ParamStep::new(ctx, interval);
    worker
        .serve(Arc::new(step), runtime::shutdown::signal())
        .await
}
