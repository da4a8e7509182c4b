//! ingest-worker (hub): AWS AMI events -> `AmiBuilt`.
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (_, ctx, worker) = rollout::workers::start("ingest-worker").await?;
    worker
        .serve(
            Arc::new(rollout::workers::IngestStep::new(ctx)),
            runtime::shutdown::signal(),
        )
        .await
}
