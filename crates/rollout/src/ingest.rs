//! ingest (hub): turn AWS's own "an AMI is ready" events into `AmiBuilt`, choosing the golden
//! parameter by the policy's families (name prefix or `amiflow:family` tag). AMIs of no family
//! are ignored with a log line: most AMIs an account builds are not golden.

use events::{AmiBuilt, AmiStateChange, Detail};
use runtime::StepError;

use crate::aws::Images;
use crate::policy::Policy;

pub async fn ingest_ami(
    change: &AmiStateChange,
    images: &impl Images,
    policy: &Policy,
) -> Result<Vec<Detail>, StepError> {
    if change.state != "available" {
        tracing::debug!(ami = %change.image_id, state = %change.state, "AMI not available; nothing to roll out");
        return Ok(Vec::new());
    }
    if !change.account.is_empty() && change.account != policy.hub_account {
        return Err(StepError::Permanent(format!(
            "AMI state change from account {}, but the hub in the rollout policy is {}",
            change.account, policy.hub_account
        )));
    }
    let image = images.describe(&change.image_id).await?.ok_or_else(|| {
        StepError::Transient(format!(
            "AMI {} announced available but not visible yet",
            change.image_id
        ))
    })?;
    let Some(family) = policy.family_of(&image.name, image.family_tag.as_deref()) else {
        tracing::info!(ami = %image.id, name = %image.name, "AMI matches no golden family; ignored");
        return Ok(Vec::new());
    };
    let created = image.created_at.unwrap_or_else(chrono::Utc::now);
    let region = if change.region.is_empty() {
        policy.region.clone()
    } else {
        change.region.clone()
    };
    Ok(vec![
        AmiBuilt::new(
            &image.id,
            &region,
            &image.name,
            created,
            &family.parameter_name,
        )
        .into(),
    ])
}
