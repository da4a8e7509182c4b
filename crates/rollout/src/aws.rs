//! Narrow capabilities over AWS, one trait per thing a step needs (not per SDK client), each with
//! a real implementation that is a few lines over the SDK. Steps take `&impl Trait`, so their
//! logic is unit-tested with in-memory fakes and the SDK replies with `aws-smithy-mocks`.
//!
//! Idempotent AWS answers ("already shared", "no updates are to be performed") are turned into
//! success here, matched by error code, never by message text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::types::{
    AlarmSpecification, DesiredConfiguration, Filter as AsgFilter, LaunchTemplateSpecification,
    MixedInstancesPolicy, RefreshPreferences, Tag,
};
use aws_sdk_cloudformation::types::{Capability, Parameter as CfnParameter};
use aws_sdk_ec2::types::{
    CreateVolumePermission, CreateVolumePermissionModifications, Filter, LaunchPermission,
    LaunchPermissionModifications, RequestLaunchTemplateData,
};
use aws_sdk_ssm::types::ParameterType;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use chrono::{DateTime, Utc};
use runtime::StepError;

fn code_of<E: ProvideErrorMetadata, R>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

// ---------------------------------------------------------------- images (EC2, hub and spokes)

/// What amiflow needs to know about an AMI.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub created_at: Option<DateTime<Utc>>,
    pub family_tag: Option<String>,
    pub state: String,
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
        state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
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

// ---------------------------------------------------------------- KMS grants

pub trait Keys: Send + Sync {
    /// Make sure `grantee` may use `key` for EBS (decrypt, re-encrypt, create grants).
    fn ensure_grant(
        &self,
        key: &str,
        grantee: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

#[derive(Clone)]
pub struct KmsKeys(pub aws_sdk_kms::Client);

impl Keys for KmsKeys {
    async fn ensure_grant(&self, key: &str, grantee: &str, name: &str) -> Result<(), StepError> {
        use aws_sdk_kms::types::GrantOperation as Op;
        let grants = self
            .0
            .list_grants()
            .key_id(key)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("kms:ListGrants", &e))?;
        if grants
            .grants()
            .iter()
            .any(|g| g.grantee_principal() == Some(grantee) && g.name() == Some(name))
        {
            return Ok(());
        }
        self.0
            .create_grant()
            .key_id(key)
            .grantee_principal(grantee)
            .name(name)
            .set_operations(Some(vec![
                Op::Decrypt,
                Op::DescribeKey,
                Op::CreateGrant,
                Op::ReEncryptFrom,
                Op::ReEncryptTo,
                Op::GenerateDataKeyWithoutPlaintext,
            ]))
            .send()
            .await
            .map_err(|e| StepError::from_sdk("kms:CreateGrant", &e))?;
        Ok(())
    }
}

// ---------------------------------------------------------------- SSM golden parameters

#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue {
    pub value: String,
    pub version: i64,
    pub data_type: String,
}

pub trait Parameters: Send + Sync {
    fn get(&self, name: &str)
    -> impl Future<Output = Result<Option<ParamValue>, StepError>> + Send;
    /// Write an `aws:ec2:image` value (overwriting); returns the new version.
    fn put_image(
        &self,
        name: &str,
        ami: &str,
    ) -> impl Future<Output = Result<i64, StepError>> + Send;
    /// Every value the parameter ever held, oldest first.
    fn history(&self, name: &str) -> impl Future<Output = Result<Vec<String>, StepError>> + Send;
}

#[derive(Clone)]
pub struct SsmParameters(pub aws_sdk_ssm::Client);

impl Parameters for SsmParameters {
    async fn get(&self, name: &str) -> Result<Option<ParamValue>, StepError> {
        match self.0.get_parameter().name(name).send().await {
            Ok(out) => Ok(out.parameter().map(|p| ParamValue {
                value: p.value().unwrap_or_default().to_owned(),
                version: p.version(),
                data_type: p.data_type().unwrap_or("text").to_owned(),
            })),
            Err(e) if code_of(&e) == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(StepError::from_sdk("ssm:GetParameter", &e)),
        }
    }

    async fn put_image(&self, name: &str, ami: &str) -> Result<i64, StepError> {
        runtime::limits::acquire(runtime::limits::Api::SsmPutParameter).await;
        let out = self
            .0
            .put_parameter()
            .name(name)
            .value(ami)
            .r#type(ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ssm:PutParameter", &e))?;
        Ok(out.version())
    }

    async fn history(&self, name: &str) -> Result<Vec<String>, StepError> {
        let mut pages = self
            .0
            .get_parameter_history()
            .name(name)
            .max_results(50)
            .into_paginator()
            .send();
        let mut values = Vec::new();
        while let Some(page) = pages.next().await {
            match page {
                Ok(page) => values.extend(
                    page.parameters()
                        .iter()
                        .filter_map(|p| p.value().map(str::to_owned)),
                ),
                Err(e) if code_of(&e) == Some("ParameterNotFound") => return Ok(Vec::new()),
                Err(e) => return Err(StepError::from_sdk("ssm:GetParameterHistory", &e)),
            }
        }
        Ok(values)
    }
}

// ---------------------------------------------------------------- Auto Scaling groups

/// Where a group takes its AMI from.
#[derive(Debug, Clone, PartialEq)]
pub enum LaunchSource {
    /// A launch template, possibly inside a mixed-instances policy; `version` as the group says it
    /// (`"3"`, `"$Latest"`, `"$Default"`).
    Template {
        id: String,
        version: String,
        mixed: Option<Box<MixedInstancesPolicy>>,
    },
    LaunchConfiguration(String),
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub source: LaunchSource,
    pub tags: HashMap<String, String>,
    pub instance_ids: Vec<String>,
}

/// One launch template version, as much as amiflow reads of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateVersion {
    pub number: i64,
    pub image_id: String,
    pub is_default: bool,
}

/// An instance refresh as amiflow reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refresh {
    pub id: String,
    pub status: String,
    pub reason: String,
    /// The launch template version of the refresh's desired configuration, if it has one.
    pub desired_version: Option<String>,
}

/// The launch template version a desired configuration moves a group to.
pub fn desired_version(desired: &DesiredConfiguration) -> Option<String> {
    desired
        .launch_template()
        .or_else(|| {
            desired
                .mixed_instances_policy()
                .and_then(|m| m.launch_template())
                .and_then(|lt| lt.launch_template_specification())
        })
        .and_then(|spec| spec.version().map(str::to_owned))
}

impl Refresh {
    pub fn is_active(&self) -> bool {
        matches!(
            self.status.as_str(),
            "Pending" | "InProgress" | "Cancelling" | "RollbackInProgress" | "Baking"
        )
    }
}

/// What to start a refresh with.
#[derive(Debug, Clone, Default)]
pub struct RefreshRequest {
    pub desired: Option<DesiredConfiguration>,
    pub auto_rollback: bool,
    /// Skip instances already on the target launch template version. Only meaningful when the
    /// refresh changes the version: with the same version (a `resolve:ssm:` template, a stack that
    /// re-resolved its parameter in place) AWS would skip every instance and replace none.
    pub skip_matching: bool,
    pub min_healthy_percentage: i32,
    pub checkpoints: Vec<i32>,
    pub checkpoint_delay: Option<i32>,
    pub alarms: Vec<String>,
}

pub trait Groups: Send + Sync {
    fn list(&self) -> impl Future<Output = Result<Vec<Group>, StepError>> + Send;
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Group>, StepError>> + Send;
    /// Groups whose tag `key` has exactly `value` (a server-side filter: cheap at any size).
    fn with_tag_value(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<Group>, StepError>> + Send;
    /// Create or update several tags of one group in one call.
    fn set_tags(
        &self,
        group: &str,
        tags: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    /// A version by number, `$Latest` or `$Default`.
    fn template_version(
        &self,
        template: &str,
        version: &str,
    ) -> impl Future<Output = Result<Option<TemplateVersion>, StepError>> + Send;
    fn version_with_image(
        &self,
        template: &str,
        ami: &str,
    ) -> impl Future<Output = Result<Option<i64>, StepError>> + Send;
    fn create_version(
        &self,
        template: &str,
        source: i64,
        ami: &str,
    ) -> impl Future<Output = Result<i64, StepError>> + Send;
    fn set_default_version(
        &self,
        template: &str,
        version: i64,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    fn launch_configuration_image(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, StepError>> + Send;
    /// Newest refreshes first.
    fn refreshes(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Refresh>, StepError>> + Send;
    fn start_refresh(
        &self,
        group: &str,
        request: &RefreshRequest,
    ) -> impl Future<Output = Result<String, StepError>> + Send;
    /// AMI of each instance id.
    fn instance_images(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, String>, StepError>> + Send;
}

#[derive(Clone)]
pub struct AwsGroups {
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
    /// Tag writes go out together with those of other steps in this process (see [`TagBatch`]).
    pub tag_batch: Option<Arc<TagBatch>>,
}

/// The tag writes of concurrent steps, sent together. A write waits up to `linger` for others;
/// those that arrived by then go out in one `CreateOrUpdateTags` call (it takes the tags of many
/// groups), so the marks and closes of a busy window cost a fraction of a call each out of the
/// account's shared Auto Scaling bucket. Each caller still waits until its own write is made or
/// has failed. If a joint write fails (a group deleted meanwhile), each write is tried alone, so
/// one group's error is never another's.
#[derive(Debug)]
pub struct TagBatch {
    linger: Duration,
    pending: std::sync::Mutex<Vec<PendingTags>>,
}

#[derive(Debug)]
struct PendingTags {
    tags: Vec<Tag>,
    done: tokio::sync::oneshot::Sender<Result<(), StepError>>,
}

/// At most this many tags per call (AWS documents no limit; a group holds at most 50 tags).
const TAGS_PER_CALL: usize = 50;

async fn write_tags(client: &aws_sdk_autoscaling::Client, tags: Vec<Tag>) -> Result<(), StepError> {
    runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
    client
        .create_or_update_tags()
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| StepError::from_sdk("autoscaling:CreateOrUpdateTags", &e))?;
    Ok(())
}

impl TagBatch {
    pub fn new(linger: Duration) -> Arc<Self> {
        Arc::new(TagBatch {
            linger,
            pending: std::sync::Mutex::new(Vec::new()),
        })
    }

    async fn write(
        self: &Arc<Self>,
        client: &aws_sdk_autoscaling::Client,
        tags: Vec<Tag>,
    ) -> Result<(), StepError> {
        let (done, written) = tokio::sync::oneshot::channel();
        let first = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(PendingTags { tags, done });
            pending.len() == 1
        };
        if first {
            // A task of its own, so a caller that gives up does not strand the others' writes.
            let (batch, client) = (Arc::clone(self), client.clone());
            tokio::spawn(async move {
                tokio::time::sleep(batch.linger).await;
                batch.flush(&client).await;
            });
        }
        written.await.unwrap_or_else(|_| {
            Err(StepError::Transient(
                "autoscaling:CreateOrUpdateTags: the joint write was dropped".into(),
            ))
        })
    }

    async fn flush(&self, client: &aws_sdk_autoscaling::Client) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut calls: Vec<Vec<PendingTags>> = Vec::new();
        for p in pending {
            match calls.last_mut() {
                Some(call)
                    if call.iter().map(|c| c.tags.len()).sum::<usize>() + p.tags.len()
                        <= TAGS_PER_CALL =>
                {
                    call.push(p);
                }
                _ => calls.push(vec![p]),
            }
        }
        for call in calls {
            let all: Vec<Tag> = call.iter().flat_map(|p| p.tags.iter().cloned()).collect();
            match write_tags(client, all).await {
                Ok(()) => {
                    for p in call {
                        let _ = p.done.send(Ok(()));
                    }
                }
                Err(e) if call.len() == 1 => {
                    for p in call {
                        let _ = p.done.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, writes = call.len(), "joint tag write failed; writing each alone");
                    for p in call {
                        let alone = write_tags(client, p.tags.clone()).await;
                        let _ = p.done.send(alone);
                    }
                }
            }
        }
    }
}

fn to_group(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Group {
    let spec = |s: &LaunchTemplateSpecification| {
        (
            s.launch_template_id()
                .or(s.launch_template_name())
                .unwrap_or_default()
                .to_owned(),
            s.version().unwrap_or("$Default").to_owned(),
        )
    };
    // An empty <MixedInstancesPolicy/> (the emulator sends one for stack-created groups) is no
    // policy: only one that names a launch template counts.
    let source = if let Some(mixed) = g
        .mixed_instances_policy()
        .filter(|m| m.launch_template().is_some())
    {
        match mixed
            .launch_template()
            .and_then(|t| t.launch_template_specification())
        {
            Some(s) => {
                let (id, version) = spec(s);
                LaunchSource::Template {
                    id,
                    version,
                    mixed: Some(Box::new(mixed.clone())),
                }
            }
            None => LaunchSource::None,
        }
    } else if let Some(s) = g.launch_template() {
        let (id, version) = spec(s);
        LaunchSource::Template {
            id,
            version,
            mixed: None,
        }
    } else if let Some(lc) = g.launch_configuration_name() {
        LaunchSource::LaunchConfiguration(lc.to_owned())
    } else {
        LaunchSource::None
    };
    Group {
        name: g.auto_scaling_group_name().unwrap_or_default().to_owned(),
        source,
        tags: g
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
        instance_ids: g
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect(),
    }
}

impl AwsGroups {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        AwsGroups {
            autoscaling: aws_sdk_autoscaling::Client::new(config),
            ec2: aws_sdk_ec2::Client::new(config),
            tag_batch: None,
        }
    }

    pub fn batching_tags(mut self, batch: &Arc<TagBatch>) -> Self {
        self.tag_batch = Some(Arc::clone(batch));
        self
    }

    async fn describe(
        &self,
        names: Option<&str>,
        filter: Option<AsgFilter>,
    ) -> Result<Vec<Group>, StepError> {
        let mut request = self
            .autoscaling
            .describe_auto_scaling_groups()
            .max_records(100);
        if let Some(name) = names {
            request = request.auto_scaling_group_names(name);
        }
        if let Some(filter) = filter {
            request = request.filters(filter);
        }
        let mut pages = request.into_paginator().send();
        let mut groups = Vec::new();
        loop {
            // One token per page: each page is a call.
            runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
            let Some(page) = pages.next().await else {
                break;
            };
            let page =
                page.map_err(|e| StepError::from_sdk("autoscaling:DescribeAutoScalingGroups", &e))?;
            groups.extend(page.auto_scaling_groups().iter().map(to_group));
        }
        Ok(groups)
    }
}

fn template_filter(template: &str) -> (Option<String>, Option<String>) {
    if template.starts_with("lt-") {
        (Some(template.to_owned()), None)
    } else {
        (None, Some(template.to_owned()))
    }
}

impl Groups for AwsGroups {
    async fn list(&self) -> Result<Vec<Group>, StepError> {
        self.describe(None, None).await
    }

    async fn get(&self, name: &str) -> Result<Option<Group>, StepError> {
        Ok(self.describe(Some(name), None).await?.into_iter().next())
    }

    async fn with_tag_value(&self, key: &str, value: &str) -> Result<Vec<Group>, StepError> {
        let filter = AsgFilter::builder()
            .name(format!("tag:{key}"))
            .values(value)
            .build();
        self.describe(None, Some(filter)).await
    }

    async fn set_tags(&self, group: &str, tags: &[(&str, &str)]) -> Result<(), StepError> {
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(key, value)| {
                Tag::builder()
                    .resource_id(group)
                    .resource_type("auto-scaling-group")
                    .key(*key)
                    .value(*value)
                    .propagate_at_launch(false)
                    .build()
            })
            .collect();
        match &self.tag_batch {
            Some(batch) => batch.write(&self.autoscaling, tags).await,
            None => write_tags(&self.autoscaling, tags).await,
        }
    }

    async fn template_version(
        &self,
        template: &str,
        version: &str,
    ) -> Result<Option<TemplateVersion>, StepError> {
        let (id, name) = template_filter(template);
        let out = match self
            .ec2
            .describe_launch_template_versions()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .versions(version)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if code_of(&e).is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(StepError::from_sdk(
                    "ec2:DescribeLaunchTemplateVersions",
                    &e,
                ));
            }
        };
        Ok(out
            .launch_template_versions()
            .first()
            .map(|v| TemplateVersion {
                number: v.version_number().unwrap_or_default(),
                image_id: v
                    .launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default()
                    .to_owned(),
                is_default: v.default_version().unwrap_or(false),
            }))
    }

    async fn version_with_image(
        &self,
        template: &str,
        ami: &str,
    ) -> Result<Option<i64>, StepError> {
        let (id, name) = template_filter(template);
        let out = self
            .ec2
            .describe_launch_template_versions()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .filters(Filter::builder().name("image-id").values(ami).build())
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:DescribeLaunchTemplateVersions", &e))?;
        Ok(out
            .launch_template_versions()
            .iter()
            .filter_map(|v| v.version_number())
            .max())
    }

    async fn create_version(
        &self,
        template: &str,
        source: i64,
        ami: &str,
    ) -> Result<i64, StepError> {
        let (id, name) = template_filter(template);
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        let out = self
            .ec2
            .create_launch_template_version()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .source_version(source.to_string())
            .version_description(format!("amiflow: {ami}"))
            .launch_template_data(RequestLaunchTemplateData::builder().image_id(ami).build())
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:CreateLaunchTemplateVersion", &e))?;
        Ok(out
            .launch_template_version()
            .and_then(|v| v.version_number())
            .unwrap_or_default())
    }

    async fn set_default_version(&self, template: &str, version: i64) -> Result<(), StepError> {
        let (id, name) = template_filter(template);
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        self.ec2
            .modify_launch_template()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .default_version(version.to_string())
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:ModifyLaunchTemplate", &e))?;
        Ok(())
    }

    async fn launch_configuration_image(&self, name: &str) -> Result<Option<String>, StepError> {
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        let out = self
            .autoscaling
            .describe_launch_configurations()
            .launch_configuration_names(name)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("autoscaling:DescribeLaunchConfigurations", &e))?;
        Ok(out
            .launch_configurations()
            .first()
            .and_then(|c| c.image_id())
            .map(str::to_owned))
    }

    async fn refreshes(&self, group: &str) -> Result<Vec<Refresh>, StepError> {
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        let out = self
            .autoscaling
            .describe_instance_refreshes()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("autoscaling:DescribeInstanceRefreshes", &e))?;
        Ok(out
            .instance_refreshes()
            .iter()
            .map(|r| Refresh {
                id: r.instance_refresh_id().unwrap_or_default().to_owned(),
                status: r
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                reason: r.status_reason().unwrap_or_default().to_owned(),
                desired_version: r.desired_configuration().and_then(desired_version),
            })
            .collect())
    }

    async fn start_refresh(
        &self,
        group: &str,
        request: &RefreshRequest,
    ) -> Result<String, StepError> {
        let mut preferences = RefreshPreferences::builder()
            .min_healthy_percentage(request.min_healthy_percentage)
            .skip_matching(request.skip_matching)
            .auto_rollback(request.auto_rollback);
        if !request.checkpoints.is_empty() {
            preferences = preferences.set_checkpoint_percentages(Some(request.checkpoints.clone()));
            preferences = preferences.set_checkpoint_delay(request.checkpoint_delay);
        }
        if !request.alarms.is_empty() {
            preferences = preferences.alarm_specification(
                AlarmSpecification::builder()
                    .set_alarms(Some(request.alarms.clone()))
                    .build(),
            );
        }
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        let out = self
            .autoscaling
            .start_instance_refresh()
            .auto_scaling_group_name(group)
            .set_desired_configuration(request.desired.clone())
            .preferences(preferences.build())
            .send()
            .await
            .map_err(|e| match code_of(&e) {
                // Someone (or we, a moment ago) already runs one: try again later, never twice.
                Some("InstanceRefreshInProgress") => StepError::Transient(format!(
                    "autoscaling:StartInstanceRefresh: {group} already has a refresh in progress"
                )),
                _ => StepError::from_sdk("autoscaling:StartInstanceRefresh", &e),
            })?;
        Ok(out.instance_refresh_id().unwrap_or_default().to_owned())
    }

    async fn instance_images(&self, ids: &[String]) -> Result<HashMap<String, String>, StepError> {
        let mut images = HashMap::new();
        for chunk in ids.chunks(200) {
            let mut pages = self
                .ec2
                .describe_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| StepError::from_sdk("ec2:DescribeInstances", &e))?;
                for reservation in page.reservations() {
                    for i in reservation.instances() {
                        if let (Some(id), Some(image)) = (i.instance_id(), i.image_id()) {
                            images.insert(id.to_owned(), image.to_owned());
                        }
                    }
                }
            }
        }
        Ok(images)
    }
}

// ---------------------------------------------------------------- CloudFormation stacks

#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub name: String,
    pub status: String,
    /// (key, value as given, resolved value for SSM parameter types)
    pub parameters: Vec<(String, String, Option<String>)>,
}

pub trait Stacks: Send + Sync {
    fn describe(&self, name: &str)
    -> impl Future<Output = Result<Option<Stack>, StepError>> + Send;
    /// `UpdateStack` with the previous template and every previous value; `false` when
    /// CloudFormation says there is nothing to update.
    fn update_with_previous(
        &self,
        stack: &Stack,
    ) -> impl Future<Output = Result<bool, StepError>> + Send;
}

#[derive(Clone)]
pub struct CfnStacks(pub aws_sdk_cloudformation::Client);

impl Stacks for CfnStacks {
    async fn describe(&self, name: &str) -> Result<Option<Stack>, StepError> {
        let out = match self.0.describe_stacks().stack_name(name).send().await {
            Ok(out) => out,
            Err(e) if code_of(&e) == Some("ValidationError") => return Ok(None),
            Err(e) => return Err(StepError::from_sdk("cloudformation:DescribeStacks", &e)),
        };
        Ok(out.stacks().first().map(|s| Stack {
            name: s.stack_name().unwrap_or_default().to_owned(),
            status: s
                .stack_status()
                .map(|st| st.as_str().to_owned())
                .unwrap_or_default(),
            parameters: s
                .parameters()
                .iter()
                .map(|p| {
                    (
                        p.parameter_key().unwrap_or_default().to_owned(),
                        p.parameter_value().unwrap_or_default().to_owned(),
                        p.resolved_value().map(str::to_owned),
                    )
                })
                .collect(),
        }))
    }

    async fn update_with_previous(&self, stack: &Stack) -> Result<bool, StepError> {
        let parameters: Vec<CfnParameter> = stack
            .parameters
            .iter()
            .map(|(key, _, _)| {
                CfnParameter::builder()
                    .parameter_key(key)
                    .use_previous_value(true)
                    .build()
            })
            .collect();
        match self
            .0
            .update_stack()
            .stack_name(&stack.name)
            .use_previous_template(true)
            .set_parameters(Some(parameters))
            .capabilities(Capability::CapabilityIam)
            .capabilities(Capability::CapabilityNamedIam)
            .capabilities(Capability::CapabilityAutoExpand)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            // CloudFormation answers "No updates are to be performed." as a ValidationError; the
            // stack is already where we want it. (Its other ValidationErrors are permanent.)
            Err(e)
                if code_of(&e) == Some("ValidationError")
                    && e.as_service_error()
                        .and_then(|s| s.message())
                        .is_some_and(|m| m.contains("No updates")) =>
            {
                Ok(false)
            }
            Err(e) => Err(StepError::from_sdk("cloudformation:UpdateStack", &e)),
        }
    }
}

/// Tag writes of concurrent steps share calls, and one group's failure is not another's.
#[cfg(test)]
mod tag_batch_tests {
    use super::*;
    use aws_sdk_autoscaling::operation::create_or_update_tags::CreateOrUpdateTagsOutput;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use std::collections::BTreeSet;

    fn batched(autoscaling: aws_sdk_autoscaling::Client) -> AwsGroups {
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []);
        AwsGroups {
            autoscaling,
            ec2,
            tag_batch: None,
        }
        .batching_tags(&TagBatch::new(Duration::from_millis(50)))
    }

    fn groups_of(tags: &[Tag]) -> BTreeSet<String> {
        tags.iter()
            .filter_map(|t| t.resource_id().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn writes_made_together_go_out_in_one_call() {
        let joint = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).len() == 3)
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&joint]);
        let groups = batched(autoscaling);
        let (a, b, c) = tokio::join!(
            groups.set_tags("a", &[("k", "1"), ("l", "1")]),
            groups.set_tags("b", &[("k", "2")]),
            groups.set_tags("c", &[("k", "3")]),
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
        assert_eq!(joint.num_calls(), 1);
    }

    #[tokio::test]
    async fn a_joint_write_that_fails_is_made_again_one_group_at_a_time() {
        let refused = || {
            HttpResponse::new(
                StatusCode::try_from(400).unwrap(),
                SdkBody::from(
                    "<ErrorResponse><Error><Type>Sender</Type><Code>ValidationError</Code><Message>AutoScalingGroup name not found - gone</Message></Error><RequestId>1</RequestId></ErrorResponse>",
                ),
            )
        };
        let joint = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).len() == 2)
            .then_http_response(refused);
        let gone = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).contains("gone"))
            .then_http_response(refused);
        let alone = mock!(aws_sdk_autoscaling::Client::create_or_update_tags)
            .match_requests(|r| groups_of(r.tags()).contains("web"))
            .then_output(|| CreateOrUpdateTagsOutput::builder().build());
        let autoscaling = mock_client!(
            aws_sdk_autoscaling,
            RuleMode::MatchAny,
            [&joint, &gone, &alone]
        );
        let groups = batched(autoscaling);
        let (web, gone_result) = tokio::join!(
            groups.set_tags("web", &[("k", "1")]),
            groups.set_tags("gone", &[("k", "2")]),
        );
        web.unwrap();
        let err = gone_result.unwrap_err();
        assert!(err.reason().contains("not found - gone"), "{err:?}");
        assert_eq!(
            (joint.num_calls(), gone.num_calls(), alone.num_calls()),
            (1, 1, 1)
        );
    }
}

/// A worker whose role lacks a permission: each service's real refusal, as the SDK parses it from
/// the wire, must become a permanent error that names the action (it then goes to the DLQ with
/// that reason, never retried).
#[cfg(test)]
mod permission_tests {
    use super::*;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    const WHO: &str = "User: arn:aws:sts::222222222222:assumed-role/amiflow-refresh-worker/i-0 is not authorized to perform";

    fn reply(status: u16, body: String) -> HttpResponse {
        HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body))
    }

    fn assert_refused(err: StepError, action: &str, code: &str) {
        let StepError::Permanent(reason) = &err else {
            panic!("{action}: a missing permission must be permanent, got {err:?}");
        };
        assert!(
            reason.starts_with(&format!(
                "{action}: {code}: this worker's role may not call {action};"
            )),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{WHO}: {action}")),
            "AWS's words are kept: {reason}"
        );
        assert!(!err.is_retryable());
    }

    fn groups(ec2: aws_sdk_ec2::Client, autoscaling: aws_sdk_autoscaling::Client) -> AwsGroups {
        AwsGroups {
            autoscaling,
            ec2,
            tag_batch: None,
        }
    }

    #[tokio::test]
    async fn ec2_unauthorized_operation_names_the_action() {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation. {WHO}: ec2:CreateLaunchTemplateVersion on resource: arn:aws:ec2:us-east-1:222222222222:launch-template/lt-0abc because no identity-based policy allows the ec2:CreateLaunchTemplateVersion action. Encoded authorization failure message: {}</Message></Error></Errors><RequestID>5c0d2b1e-1</RequestID></Response>",
            "x".repeat(6000)
        );
        let rule = mock!(aws_sdk_ec2::Client::create_launch_template_version)
            .then_http_response(move || reply(403, body.clone()));
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&rule]);
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, []);
        let err = groups(ec2, autoscaling)
            .create_version("lt-0abc", 2, "ami-0a1b2c3d4e5f60718")
            .await
            .unwrap_err();
        assert_refused(
            err,
            "ec2:CreateLaunchTemplateVersion",
            "UnauthorizedOperation",
        );
        assert_eq!(rule.num_calls(), 1, "not retried");
    }

    #[tokio::test]
    async fn ssm_access_denied_exception_names_the_action() {
        let body = format!(
            r#"{{"__type":"AccessDeniedException","message":"{WHO}: ssm:PutParameter on resource: arn:aws:ssm:us-east-1:222222222222:parameter/golden/al2023/ami-id because no identity-based policy allows the ssm:PutParameter action"}}"#
        );
        let rule = mock!(aws_sdk_ssm::Client::put_parameter)
            .then_http_response(move || reply(400, body.clone()));
        let ssm = mock_client!(aws_sdk_ssm, RuleMode::MatchAny, [&rule]);
        let err = SsmParameters(ssm)
            .put_image("/golden/al2023/ami-id", "ami-0a1b2c3d4e5f60718")
            .await
            .unwrap_err();
        assert_refused(err, "ssm:PutParameter", "AccessDeniedException");
        assert_eq!(rule.num_calls(), 1, "not retried");
    }

    #[tokio::test]
    async fn auto_scaling_access_denied_names_the_action() {
        let body = format!(
            "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{WHO}: autoscaling:StartInstanceRefresh on resource: arn:aws:autoscaling:us-east-1:222222222222:autoScalingGroup:*:autoScalingGroupName/uat-web because no identity-based policy allows the autoscaling:StartInstanceRefresh action</Message></Error><RequestId>9f1c</RequestId></ErrorResponse>"
        );
        let rule = mock!(aws_sdk_autoscaling::Client::start_instance_refresh)
            .then_http_response(move || reply(403, body.clone()));
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&rule]);
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []);
        let err = groups(ec2, autoscaling)
            .start_refresh("uat-web", &RefreshRequest::default())
            .await
            .unwrap_err();
        assert_refused(err, "autoscaling:StartInstanceRefresh", "AccessDenied");
        assert_eq!(rule.num_calls(), 1, "not retried");
    }
}
