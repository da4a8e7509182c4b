//! share-worker (hub): `AmiBuilt` -> launch/snapshot permissions, KMS grants -> `AmiShared`.
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (_, ctx, worker) = rollout::workers::start("share-worker").await?;
    worker
        .serve(
            Arc::new(rollout::workers::ShareStep::new(ctx)),
            runtime::shutdown::signal(),
        )
        .await
}
