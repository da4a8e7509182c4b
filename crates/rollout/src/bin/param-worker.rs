//! param-worker (spoke): `AmiShared` -> golden parameter written and read back -> `ParamUpdated`.
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (_, ctx, worker) = rollout::workers::start("param-worker").await?;
    let interval: f64 = runtime::config::var_or("AMIFLOW_READ_BACK_SECONDS", 2.0)?;
    let step = rollout::workers::ParamStep {
        ctx,
        read_back_interval: Duration::from_secs_f64(interval),
    };
    worker
        .serve(Arc::new(step), runtime::shutdown::signal())
        .await
}
