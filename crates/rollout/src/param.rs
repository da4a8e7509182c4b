//! param-worker (spoke): write the shared AMI into this account's golden parameter, never
//! regressing it. The AMI must be visible here first; the write uses `DataType = aws:ec2:image`,
//! which AWS validates asynchronously, so the value is read back before `ParamUpdated` goes out.

use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use events::{AmiShared, Detail, ParamUpdated};
use runtime::StepError;

use crate::aws::{Images, Parameters};

/// Reading back after a write: AWS validates `aws:ec2:image` asynchronously.
pub const READ_BACK_ATTEMPTS: usize = 10;

pub async fn update_parameter(
    shared: &AmiShared,
    account: &str,
    images: &impl Images,
    params: &impl Parameters,
    read_back_interval: Duration,
) -> Result<Vec<Detail>, StepError> {
    let name = shared.parameter_name.as_str();
    // Visible from here? Sharing can take a moment to propagate: transient, then DLQ with reason.
    let new = images.describe(&shared.ami_id).await?.ok_or_else(|| {
        StepError::Transient(format!(
            "AMI {} is not visible from account {account}: was it shared with this account?",
            shared.ami_id
        ))
    })?;
    let current = params.get(name).await?;
    if let Some(current) = &current {
        if current.data_type != "aws:ec2:image" {
            return Err(StepError::Permanent(format!(
                "parameter {name} has DataType {:?}; amiflow only writes aws:ec2:image parameters (recreate it with --data-type aws:ec2:image)",
                current.data_type
            )));
        }
        if current.value == shared.ami_id {
            return Ok(vec![updated(
                shared,
                account,
                current.value.clone(),
                None,
                current.version,
            )]);
        }
        // Never regress: an AMI created later than this one stays.
        if let Some(existing) = images.describe(&current.value).await?
            && let (Some(theirs), Some(ours)) = (existing.created_at, new.created_at)
            && theirs > ours
        {
            tracing::info!(parameter = name, current = %current.value, offered = %shared.ami_id, "parameter holds a newer AMI; not regressing");
            return Ok(vec![updated(
                shared,
                account,
                current.value.clone(),
                None,
                current.version,
            )]);
        }
    }
    let previous = current.as_ref().map(|c| c.value.clone());
    params.put_image(name, &shared.ami_id).await?;
    let ami = shared.ami_id.clone();
    // Err(None) means "not there yet": retried; Err(Some(e)) is a real failure: stops at once.
    let confirmed = (|| async {
        match params.get(name).await {
            Ok(Some(p)) if p.value == ami => Ok(p),
            Ok(_) => Err(None),
            Err(e) => Err(Some(e)),
        }
    })
    .retry(
        ConstantBuilder::default()
            .with_delay(read_back_interval)
            .with_max_times(READ_BACK_ATTEMPTS),
    )
    .when(|e: &Option<StepError>| e.is_none())
    .await;
    match confirmed {
        Ok(p) => Ok(vec![updated(shared, account, p.value, previous, p.version)]),
        Err(Some(e)) => Err(e),
        Err(None) => Err(StepError::Permanent(format!(
            "parameter {name} did not keep {ami} (aws:ec2:image validation rejected it?); it still holds {}",
            previous.as_deref().unwrap_or("nothing")
        ))),
    }
}

fn updated(
    shared: &AmiShared,
    account: &str,
    ami: String,
    previous: Option<String>,
    version: i64,
) -> Detail {
    ParamUpdated::new(
        &shared.meta.key,
        account,
        &shared.parameter_name,
        &ami,
        previous,
        version,
    )
    .into()
}
