//! ingest (hub): turn AWS's own "an AMI is ready" events into `AmiBuilt`, choosing the golden
//! parameter by the policy's families (name prefix or `amiflow:family` tag). AMIs of no family
//! are ignored with a log line: most AMIs an account builds are not golden.
//!
//! An Image Builder event carries no AMI id, only the image build's ARN; Image Builder tags every
//! AMI it outputs with that ARN (`Ec2ImageBuilderArn`), so the AMI is found with one
//! DescribeImages by tag, without the Image Builder API.

use events::{AmiBuilt, AmiStateChange, Detail, ImageBuilderStateChange};
use runtime::StepError;

use crate::aws::{IMAGE_BUILDER_TAG, Image, Images};
use crate::policy::Policy;

fn check_hub(account: &str, policy: &Policy, what: &str) -> Result<(), StepError> {
    if !account.is_empty() && account != policy.hub_account {
        return Err(StepError::Permanent(format!(
            "{what} from account {account}, but the hub in the rollout policy is {}",
            policy.hub_account
        )));
    }
    Ok(())
}

/// `AmiBuilt` for `image` if it belongs to a golden family.
fn built(image: &Image, region: &str, policy: &Policy) -> Vec<Detail> {
    let Some(family) = policy.family_of(&image.name, image.family_tag.as_deref()) else {
        tracing::info!(ami = %image.id, name = %image.name, "AMI matches no golden family; ignored");
        return Vec::new();
    };
    let created = image.created_at.unwrap_or_else(chrono::Utc::now);
    let region = if region.is_empty() {
        policy.region.as_str()
    } else {
        region
    };
    vec![
        AmiBuilt::new(
            &image.id,
            region,
            &image.name,
            created,
            &family.parameter_name,
        )
        .into(),
    ]
}

pub async fn ingest_image_builder(
    change: &ImageBuilderStateChange,
    images: &impl Images,
    policy: &Policy,
) -> Result<Vec<Detail>, StepError> {
    if change.status != "AVAILABLE" {
        tracing::debug!(image = %change.image_arn, status = %change.status, "Image Builder image not available; nothing to roll out");
        return Ok(Vec::new());
    }
    check_hub(&change.account, policy, "Image Builder image")?;
    let image = images.built_by(&change.image_arn).await?.ok_or_else(|| {
        StepError::Transient(format!(
            "Image Builder image {} is AVAILABLE but no AMI of this account is tagged {IMAGE_BUILDER_TAG} with it yet",
            change.image_arn
        ))
    })?;
    Ok(built(&image, &change.region, policy))
}

pub async fn ingest_ami(
    change: &AmiStateChange,
    images: &impl Images,
    policy: &Policy,
) -> Result<Vec<Detail>, StepError> {
    if change.state != "available" {
        tracing::debug!(ami = %change.image_id, state = %change.state, "AMI not available; nothing to roll out");
        return Ok(Vec::new());
    }
    check_hub(&change.account, policy, "AMI state change")?;
    let image = images.describe(&change.image_id).await?.ok_or_else(|| {
        StepError::Transient(format!(
            "AMI {} announced available but not visible yet",
            change.image_id
        ))
    })?;
    Ok(built(&image, &change.region, policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;
    use chrono::TimeZone;

    const ARN: &str = "arn:aws:imagebuilder:us-east-1:111111111111:image/golden-al2023/1.0.0/7";

    fn policy() -> Policy {
        Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap()
    }

    fn aws_with(name: &str) -> FakeAws {
        let aws = FakeAws::default();
        aws.images.lock().unwrap().insert(
            "ami-0000000000000000b".into(),
            Image {
                id: "ami-0000000000000000b".into(),
                name: name.into(),
                owner: "111111111111".into(),
                created_at: Some(chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()),
                family_tag: None,
                state: "available".into(),
                snapshots: vec![],
            },
        );
        aws.built_by
            .lock()
            .unwrap()
            .insert(ARN.into(), "ami-0000000000000000b".into());
        aws
    }

    fn change(state: &str) -> AmiStateChange {
        AmiStateChange {
            account: "111111111111".into(),
            region: "us-east-1".into(),
            image_id: "ami-0000000000000000b".into(),
            state: state.into(),
            error_message: String::new(),
        }
    }

    fn builder(status: &str, account: &str) -> ImageBuilderStateChange {
        ImageBuilderStateChange {
            account: account.into(),
            region: "us-east-1".into(),
            image_arn: ARN.into(),
            status: status.into(),
        }
    }

    fn only_built(details: &[Detail]) -> &AmiBuilt {
        match details {
            [Detail::AmiBuilt(b)] => b,
            other => panic!("expected one AmiBuilt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_available_golden_ami_becomes_ami_built_for_its_family() {
        let aws = aws_with("golden-al2023-2026-11");
        let out = ingest_ami(&change("available"), &aws, &policy())
            .await
            .unwrap();
        let b = only_built(&out);
        assert_eq!(b.parameter_name, "/golden/al2023/ami-id");
        assert_eq!(b.meta.key, "built:ami-0000000000000000b");
        assert!(
            ingest_ami(&change("pending"), &aws, &policy())
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_ami_of_no_family_is_ignored_not_an_error() {
        let aws = aws_with("team-experiment-7");
        assert!(
            ingest_ami(&change("available"), &aws, &policy())
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_image_builder_image_is_resolved_to_its_ami_by_tag() {
        let aws = aws_with("golden-al2023-2026-11");
        let out = ingest_image_builder(&builder("AVAILABLE", "111111111111"), &aws, &policy())
            .await
            .unwrap();
        assert_eq!(only_built(&out).ami_id, "ami-0000000000000000b");
        let building = builder("BUILDING", "111111111111");
        assert!(
            ingest_image_builder(&building, &aws, &policy())
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_image_builder_image_without_a_tagged_ami_yet_is_retried() {
        let aws = aws_with("golden-al2023-2026-11");
        aws.built_by.lock().unwrap().clear();
        let err = ingest_image_builder(&builder("AVAILABLE", "111111111111"), &aws, &policy())
            .await
            .unwrap_err();
        assert!(
            err.is_retryable() && err.to_string().contains(IMAGE_BUILDER_TAG),
            "{err}"
        );
    }

    #[tokio::test]
    async fn events_from_an_account_that_is_not_the_hub_are_refused() {
        let aws = aws_with("golden-al2023-2026-11");
        let err = ingest_image_builder(&builder("AVAILABLE", "999999999999"), &aws, &policy())
            .await
            .unwrap_err();
        assert!(
            !err.is_retryable() && err.to_string().contains("999999999999"),
            "{err}"
        );
        let mut foreign = change("available");
        foreign.account = "999999999999".into();
        assert!(ingest_ami(&foreign, &aws, &policy()).await.is_err());
    }
}
