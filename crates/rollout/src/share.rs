//! share-worker (hub): make a new golden AMI usable from every target account: launch
//! permission, `createVolumePermission` on each snapshot, a KMS grant where the snapshots use a
//! customer managed key. Verified by reading back, then one `AmiShared` per account. Already
//! shared is success; the AMI owner's own account needs no permission but still gets its event.

use events::{AmiBuilt, AmiShared, Detail};
use runtime::StepError;

use crate::aws::{Images, Keys};
use crate::policy::Policy;

pub async fn share(
    built: &AmiBuilt,
    images: &impl Images,
    keys: &impl Keys,
    policy: &Policy,
) -> Result<Vec<Detail>, StepError> {
    let targets: Vec<&crate::policy::Stage> = match &built.targets {
        Some(accounts) => {
            let mut chosen = Vec::new();
            for account in accounts {
                let stage = policy.stage_for_account(account).ok_or_else(|| {
                    StepError::Permanent(format!(
                        "target account {account} is not a stage in the rollout policy"
                    ))
                })?;
                chosen.push(stage);
            }
            chosen
        }
        None => policy.stages.iter().collect(),
    };
    let image = images.describe(&built.ami_id).await?.ok_or_else(|| {
        StepError::Permanent(format!(
            "AMI {} does not exist in the hub account {} (or is not visible)",
            built.ami_id, policy.hub_account
        ))
    })?;
    if image.state != "available" {
        return Err(StepError::Transient(format!(
            "AMI {} is {}, not available yet",
            built.ami_id, image.state
        )));
    }
    let mut shared = Vec::new();
    for stage in targets {
        let account = stage.account.as_str();
        if account != image.owner {
            images.add_launch_permission(&image.id, account).await?;
            for (snapshot, key) in &image.snapshots {
                images.add_snapshot_permission(snapshot, account).await?;
                if let Some(key) = key {
                    keys.ensure_grant(
                        key,
                        &format!("arn:aws:iam::{account}:root"),
                        &format!("amiflow-{account}"),
                    )
                    .await?;
                }
            }
            // Verify: EC2 answered 200, but only a read-back proves the target can launch it.
            if !images
                .launch_permissions(&image.id)
                .await?
                .iter()
                .any(|a| a == account)
            {
                return Err(StepError::Transient(format!(
                    "launch permission for {account} on {} not visible yet",
                    image.id
                )));
            }
            for (snapshot, _) in &image.snapshots {
                if !images
                    .snapshot_permissions(snapshot)
                    .await?
                    .iter()
                    .any(|a| a == account)
                {
                    return Err(StepError::Transient(format!(
                        "createVolumePermission for {account} on {snapshot} not visible yet"
                    )));
                }
            }
        }
        shared.push(AmiShared::new(built, &image.owner, account, &stage.name).into());
    }
    Ok(shared)
}
