//! AMIs (EC2, hub and spokes): what amiflow reads of an image, and the launch and snapshot
//! permissions that share it with the spoke accounts.

use aws_sdk_ec2::types::{
    CreateVolumePermission, CreateVolumePermissionModifications, Filter, LaunchPermission,
    LaunchPermissionModifications,
};
use chrono::{DateTime, Utc};
use runtime::StepError;

use super::code_of;

/// What amiflow needs to know about an AMI.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub created_at: Option<DateTime<Utc>>,
    pub family_tag: Option<String>,
    /// Every tag of the AMI (visible to its owner only: a shared AMI's tags stay in its account).
    pub tags: std::collections::BTreeMap<String, String>,
    pub state: String,
    /// Anyone may launch it (a launch permission for the group `all`).
    pub public: bool,
    /// (snapshot id, KMS key id if encrypted with one)
    pub snapshots: Vec<(String, Option<String>)>,
}

pub trait Images: Send + Sync {
    /// `None` when the AMI does not exist or is not visible to this account.
    fn describe(&self, ami: &str) -> impl Future<Output = Result<Option<Image>, StepError>> + Send;
    /// The AMI of this account that Image Builder made in the image build `image_builder_arn`.
    fn built_by(
        &self,
        image_builder_arn: &str,
    ) -> impl Future<Output = Result<Option<Image>, StepError>> + Send;
    fn launch_permissions(
        &self,
        ami: &str,
    ) -> impl Future<Output = Result<Vec<String>, StepError>> + Send;
    fn add_launch_permission(
        &self,
        ami: &str,
        account: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    fn snapshot_permissions(
        &self,
        snapshot: &str,
    ) -> impl Future<Output = Result<Vec<String>, StepError>> + Send;
    fn add_snapshot_permission(
        &self,
        snapshot: &str,
        account: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

#[derive(Clone)]
pub struct Ec2Images(pub aws_sdk_ec2::Client);

fn to_image(i: &aws_sdk_ec2::types::Image) -> Image {
    Image {
        id: i.image_id().unwrap_or_default().to_owned(),
        name: i.name().unwrap_or_default().to_owned(),
        owner: i.owner_id().unwrap_or_default().to_owned(),
        created_at: i
            .creation_date()
            .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
            .map(|d| d.to_utc()),
        family_tag: i
            .tags()
            .iter()
            .find(|t| t.key() == Some("amiflow:family"))
            .and_then(|t| t.value())
            .map(str::to_owned),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
        state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        public: i.public().unwrap_or(false),
        snapshots: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs())
            .filter_map(|ebs| {
                let id = ebs.snapshot_id()?.to_owned();
                Some((id, ebs.kms_key_id().map(str::to_owned)))
            })
            .collect(),
    }
}

/// The tag Image Builder puts on every AMI it outputs: the ARN of the image build that made it
/// (Image Builder user guide, "Tag Image Builder output resources").
pub const IMAGE_BUILDER_TAG: &str = "Ec2ImageBuilderArn";

impl Images for Ec2Images {
    async fn describe(&self, ami: &str) -> Result<Option<Image>, StepError> {
        let out = match self.0.describe_images().image_ids(ami).send().await {
            Ok(out) => out,
            // AWS answers an invisible or unknown id with an error, not an empty list.
            Err(e)
                if matches!(
                    code_of(&e),
                    Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(StepError::from_sdk("ec2:DescribeImages", &e)),
        };
        Ok(out.images().first().map(to_image))
    }

    async fn built_by(&self, image_builder_arn: &str) -> Result<Option<Image>, StepError> {
        let out = self
            .0
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name(format!("tag:{IMAGE_BUILDER_TAG}"))
                    .values(image_builder_arn)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:DescribeImages", &e))?;
        Ok(out.images().first().map(to_image))
    }

    async fn launch_permissions(&self, ami: &str) -> Result<Vec<String>, StepError> {
        let out = self
            .0
            .describe_image_attribute()
            .image_id(ami)
            .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:DescribeImageAttribute", &e))?;
        Ok(out
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id().map(str::to_owned))
            .collect())
    }

    async fn add_launch_permission(&self, ami: &str, account: &str) -> Result<(), StepError> {
        let add = LaunchPermissionModifications::builder()
            .add(LaunchPermission::builder().user_id(account).build())
            .build();
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        match self
            .0
            .modify_image_attribute()
            .image_id(ami)
            .launch_permission(add)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if code_of(&e) == Some("InvalidPermission.Duplicate") => Ok(()),
            Err(e) => Err(StepError::from_sdk("ec2:ModifyImageAttribute", &e)),
        }
    }

    async fn snapshot_permissions(&self, snapshot: &str) -> Result<Vec<String>, StepError> {
        let out = self
            .0
            .describe_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:DescribeSnapshotAttribute", &e))?;
        Ok(out
            .create_volume_permissions()
            .iter()
            .filter_map(|p| p.user_id().map(str::to_owned))
            .collect())
    }

    async fn add_snapshot_permission(
        &self,
        snapshot: &str,
        account: &str,
    ) -> Result<(), StepError> {
        let add = CreateVolumePermissionModifications::builder()
            .add(CreateVolumePermission::builder().user_id(account).build())
            .build();
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        match self
            .0
            .modify_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .create_volume_permission(add)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if code_of(&e) == Some("InvalidPermission.Duplicate") => Ok(()),
            Err(e) => Err(StepError::from_sdk("ec2:ModifySnapshotAttribute", &e)),
        }
    }
}
