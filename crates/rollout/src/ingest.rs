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

/// `AmiBuilt` for `image` if it belongs to a golden family; refused when the hub does not own it
/// or the family trusts only some builds (or approved AMIs) and it is none of them.
fn built(image: &Image, region: &str, policy: &Policy) -> Result<Vec<Detail>, StepError> {
    let Some(family) = policy.family_of(&image.name, image.family_tag.as_deref()) else {
        tracing::info!(ami = %image.id, name = %image.name, "AMI matches no golden family; ignored");
        return Ok(Vec::new());
    };
    if let Some(why) = policy.refuse_image(image, &family.parameter_name) {
        return Err(StepError::Permanent(why));
    }
    if let Some(why) = family.untrusted(image) {
        return Err(StepError::Permanent(why));
    }
    let created = image.created_at.unwrap_or_else(chrono::Utc::now);
    let region = if region.is_empty() {
        policy.region.as_str()
    } else {
        region
    };
    Ok(vec![
        AmiBuilt::new(
            &image.id,
            region,
            &image.name,
            created,
            &family.parameter_name,
        )
        .into(),
    ])
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
    built(&image, &change.region, policy)
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
    built(&image, &change.region, policy)
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
                tags: Default::default(),
                state: "available".into(),
                public: false,
                snapshots: vec![],
            },
        );
        aws.built_by
            .lock()
            .unwrap()
            .insert(ARN.into(), "ami-0000000000000000b".into());
        aws
    }

    /// Change the test's one image in place.
    fn edit(aws: &FakeAws, change: impl FnOnce(&mut Image)) {
        change(
            aws.images
                .lock()
                .unwrap()
                .get_mut("ami-0000000000000000b")
                .unwrap(),
        );
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

    /// A family that names trusted builds and an approval tag rolls out only their AMIs: one made
    /// by hand (or by another Image Builder image) is refused with the way to trust it, and goes
    /// through once tagged approved.
    #[tokio::test]
    async fn a_family_that_trusts_some_builds_refuses_other_amis_until_approved() {
        let mut policy = policy();
        policy.families[0].trusted_builds =
            vec!["arn:aws:imagebuilder:us-east-1:111111111111:image/golden-al2023/".into()];
        policy.families[0].approval_tag = Some("amiflow:approved".into());
        let aws = aws_with("golden-al2023-2026-11");
        let set_tag = |key: &str, value: &str| {
            edit(&aws, |i| {
                i.tags.insert(key.into(), value.into());
            })
        };
        let refusal = |err: StepError| match err {
            StepError::Permanent(why) => why,
            other => panic!("a permanent refusal, not {other:?}"),
        };

        let by_hand = ingest_ami(&change("available"), &aws, &policy).await;
        assert_eq!(
            refusal(by_hand.unwrap_err()),
            "AMI ami-0000000000000000b (golden-al2023-2026-11) of /golden/al2023/ami-id was not made by Image Builder and is not approved: build it with a trusted build (arn:aws:imagebuilder:us-east-1:111111111111:image/golden-al2023/) or tag it amiflow:approved=true to approve it, then replay this message (amictl dlq replay); refused"
        );
        set_tag("amiflow:approved", "false");
        assert!(
            ingest_ami(&change("available"), &aws, &policy)
                .await
                .is_err()
        );
        set_tag("amiflow:approved", "true");
        let approved = ingest_ami(&change("available"), &aws, &policy)
            .await
            .unwrap();
        assert_eq!(only_built(&approved).ami_id, "ami-0000000000000000b");

        // Made by a trusted Image Builder image: no approval needed.
        edit(&aws, |i| i.tags.clear());
        set_tag(IMAGE_BUILDER_TAG, ARN);
        let out = ingest_image_builder(&builder("AVAILABLE", "111111111111"), &aws, &policy)
            .await
            .unwrap();
        assert_eq!(only_built(&out).ami_id, "ami-0000000000000000b");

        // Made by another image: refused, naming it.
        let other =
            "arn:aws:imagebuilder:us-east-1:111111111111:image/golden-al2023-experiment/1.0.0/1";
        set_tag(IMAGE_BUILDER_TAG, other);
        let why = refusal(
            ingest_ami(&change("available"), &aws, &policy)
                .await
                .unwrap_err(),
        );
        assert!(
            why.contains(&format!(
                "was made by Image Builder image {other}, which is not a trusted build"
            )),
            "{why}"
        );
    }

    /// An AMI in the hub that the hub does not own (a public or shared one it can see) is never
    /// rolled out.
    #[tokio::test]
    async fn an_ami_the_hub_does_not_own_is_refused() {
        let aws = aws_with("golden-al2023-2026-11");
        edit(&aws, |i| i.owner = "999999999999".into());
        let err = ingest_ami(&change("available"), &aws, &policy())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StepError::Permanent(why) if why.contains("is owned by account 999999999999, not by the hub 111111111111")),
            "{err}"
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
