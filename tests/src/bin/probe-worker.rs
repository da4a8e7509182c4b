//! A worker built on the real runtime with a trivial step, for tests and benchmarks of the
//! runtime itself: for each `AmiBuilt` it waits `PROBE_STEP_MILLIS` (default 0), then emits the
//! `AmiShared` for account 222222222222. Other events are accepted and emit nothing.

use std::sync::Arc;
use std::time::Duration;

use events::{AmiShared, Detail, Inbound};
use runtime::{Step, StepError, StepOutput, Worker, WorkerConfig};

struct Probe {
    delay: Duration,
}

impl Step for Probe {
    async fn run(&self, event: &Inbound) -> Result<StepOutput, StepError> {
        tokio::time::sleep(self.delay).await;
        Ok(StepOutput::Emit(match event {
            Inbound::Amiflow(e) => match &e.detail {
                Detail::AmiBuilt(built) => {
                    vec![AmiShared::new(built, "111111111111", "222222222222", "uat").into()]
                }
                _ => Vec::new(),
            },
            Inbound::Aws(_) => Vec::new(),
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let config = WorkerConfig::from_env("probe-worker")?;
    let delay = Duration::from_millis(runtime::config::var_or("PROBE_STEP_MILLIS", 0)?);
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let worker = Worker::connect(
        aws_sdk_sqs::Client::new(&aws),
        aws_sdk_eventbridge::Client::new(&aws),
        config,
    )
    .await?;
    worker
        .run(Arc::new(Probe { delay }), runtime::shutdown::signal())
        .await
}
