//! Auto Scaling groups: their launch source, tags, instances and instance refreshes.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_autoscaling::types::{
    AlarmSpecification, DesiredConfiguration, Filter as AsgFilter, LaunchTemplateSpecification,
    MixedInstancesPolicy, RefreshPreferences, Tag,
};
use runtime::StepError;

use super::code_of;
use super::tags::{TagBatch, write_tags};
use super::templates::Templates;

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
    /// What Auto Scaling says each instance (by id) was launched from, for those launched from a
    /// launch template: the template's id and the version as the launch named it (`"3"`, or
    /// `"$Latest"` / `"$Default"` when the group named it so). Instances of a launch configuration,
    /// or of an older template no longer named, may be absent.
    pub launched_from: HashMap<String, LaunchedFrom>,
}

impl Group {
    /// Whether Auto Scaling records that `instance` was launched from version `number` of
    /// `template`, named by its id (a name could since belong to another template): then it runs
    /// that version's image, as template versions never change.
    pub fn launched_from_version(&self, instance: &str, template: &str, number: i64) -> bool {
        template.starts_with("lt-")
            && self.launched_from.get(instance).is_some_and(|f| {
                f.template_id == template && f.version.parse::<i64>().ok() == Some(number)
            })
    }
}

/// The launch template (by id) and version an instance was launched from, as Auto Scaling
/// records it per instance in `DescribeAutoScalingGroups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchedFrom {
    pub template_id: String,
    pub version: String,
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
    /// Sent only when set (AWS's default is 100); above 100, launch before terminate.
    pub max_healthy_percentage: Option<i32>,
    /// Seconds the refresh bakes after its last replacement; sent only when set.
    pub bake_time: Option<i32>,
    pub checkpoints: Vec<i32>,
    pub checkpoint_delay: Option<i32>,
    pub alarms: Vec<String>,
}

/// What a step needs of the account's groups. A group's launch template comes with it
/// ([`Templates`]): every step that moves or judges a group reads its template.
pub trait Groups: Templates + Send + Sync {
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
    /// [`Groups::set_tags`] for a write nothing waits on but its caller (a refresh's close):
    /// where writes are batched it may wait longer for others to share its call.
    fn set_tags_unhurried(
        &self,
        group: &str,
        tags: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        self.set_tags(group, tags)
    }
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
    /// Cancel the group's running refresh; none running (any more) is success.
    fn cancel_refresh(&self, group: &str) -> impl Future<Output = Result<(), StepError>> + Send;
    /// AMI and launch time of each instance id.
    fn instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Instance>, StepError>> + Send;
    /// AMI of each instance id.
    fn instance_images(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, String>, StepError>> + Send {
        async move {
            Ok(self
                .instances(ids)
                .await?
                .into_iter()
                .map(|(id, i)| (id, i.image))
                .collect())
        }
    }
}

/// An instance as amiflow reads it: the AMI it runs and when it was launched (a gate's bake counts
/// from the last launch of a stage's refreshes).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub image: String,
    pub launched_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Clone)]
pub struct AwsGroups {
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
    /// Tag writes go out together with those of other steps in this process (see [`TagBatch`]).
    pub tag_batch: Option<Arc<TagBatch>>,
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
        launched_from: g
            .instances()
            .iter()
            .filter_map(|i| {
                let lt = i.launch_template()?;
                Some((
                    i.instance_id()?.to_owned(),
                    LaunchedFrom {
                        template_id: lt.launch_template_id()?.to_owned(),
                        version: lt.version()?.to_owned(),
                    },
                ))
            })
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
        // One token per page, each page being a call: one for the first, and one more only when a
        // page says another follows (the paginator ends without a call after the last).
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| StepError::from_sdk("autoscaling:DescribeAutoScalingGroups", &e))?;
            groups.extend(page.auto_scaling_groups().iter().map(to_group));
            if page.next_token().is_some_and(|t| !t.is_empty()) {
                runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
            }
        }
        Ok(groups)
    }

    /// The tags of one group, in one call or batched with other steps' writes.
    async fn tag(
        &self,
        group: &str,
        tags: &[(&str, &str)],
        unhurried: bool,
    ) -> Result<(), StepError> {
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
            Some(batch) => batch.write(&self.autoscaling, tags, unhurried).await,
            None => write_tags(&self.autoscaling, tags).await,
        }
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
        self.tag(group, tags, false).await
    }

    async fn set_tags_unhurried(
        &self,
        group: &str,
        tags: &[(&str, &str)],
    ) -> Result<(), StepError> {
        self.tag(group, tags, true).await
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
            .set_max_healthy_percentage(request.max_healthy_percentage)
            .set_bake_time(request.bake_time)
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

    async fn cancel_refresh(&self, group: &str) -> Result<(), StepError> {
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        match self
            .autoscaling
            .cancel_instance_refresh()
            .auto_scaling_group_name(group)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // It ended meanwhile: the poll that follows reads how.
            Err(e) if code_of(&e) == Some("ActiveInstanceRefreshNotFound") => Ok(()),
            Err(e) => Err(StepError::from_sdk("autoscaling:CancelInstanceRefresh", &e)),
        }
    }

    async fn instances(&self, ids: &[String]) -> Result<HashMap<String, Instance>, StepError> {
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
                            let launched_at = i.launch_time().and_then(|t| {
                                chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
                            });
                            images.insert(
                                id.to_owned(),
                                Instance {
                                    image: image.to_owned(),
                                    launched_at,
                                },
                            );
                        }
                    }
                }
            }
        }
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_autoscaling::operation::start_instance_refresh::{
        StartInstanceRefreshInput, StartInstanceRefreshOutput,
    };
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use std::sync::Mutex;

    /// The preferences `request` is sent with.
    async fn sent(request: &RefreshRequest) -> RefreshPreferences {
        let seen: Arc<Mutex<Option<StartInstanceRefreshInput>>> = Arc::default();
        let keep = Arc::clone(&seen);
        let start = mock!(aws_sdk_autoscaling::Client::start_instance_refresh)
            .match_requests(move |r| {
                *keep.lock().unwrap() = Some(r.clone());
                true
            })
            .then_output(|| {
                StartInstanceRefreshOutput::builder()
                    .instance_refresh_id("ir-1")
                    .build()
            });
        let groups = AwsGroups {
            autoscaling: mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&start]),
            ec2: mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []),
            tag_batch: None,
        };
        assert_eq!(groups.start_refresh("web", request).await.unwrap(), "ir-1");
        let input = seen
            .lock()
            .unwrap()
            .take()
            .expect("StartInstanceRefresh was called");
        assert_eq!(input.auto_scaling_group_name(), Some("web"));
        input.preferences().cloned().expect("preferences are sent")
    }

    /// Groups listed over `pages` pages: how many there were and how many Auto Scaling tokens
    /// the listing took.
    async fn listed(pages: usize) -> (usize, u32) {
        use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput;
        use aws_sdk_autoscaling::types::AutoScalingGroup;
        let rules: Vec<_> = (0..pages)
            .map(|i| {
                let next = (i + 1 < pages).then(|| format!("page-{}", i + 1));
                let asked = (i > 0).then(|| format!("page-{i}"));
                mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups)
                    .match_requests(move |r| r.next_token().map(str::to_owned) == asked)
                    .then_output(move || {
                        DescribeAutoScalingGroupsOutput::builder()
                            .auto_scaling_groups(
                                AutoScalingGroup::builder()
                                    .auto_scaling_group_name(format!("g{i}"))
                                    .build(),
                            )
                            .set_next_token(next.clone())
                            .build()
                    })
            })
            .collect();
        let groups = AwsGroups {
            autoscaling: mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, &rules),
            ec2: mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []),
            tag_batch: None,
        };
        let (listed, tokens) = runtime::limits::count_tokens(groups.list()).await;
        (listed.unwrap().len(), tokens)
    }

    /// Each page of `DescribeAutoScalingGroups` is one call and takes one token of the account's
    /// shared bucket; the end of the listing takes none.
    #[tokio::test]
    async fn a_listing_takes_one_auto_scaling_token_per_page_and_no_more() {
        assert_eq!(listed(1).await, (1, 1));
        assert_eq!(listed(3).await, (3, 3));
    }

    #[tokio::test]
    async fn max_healthy_percentage_and_bake_time_are_sent_only_when_the_stage_sets_them() {
        let request = RefreshRequest {
            min_healthy_percentage: 100,
            max_healthy_percentage: Some(200),
            bake_time: Some(600),
            ..RefreshRequest::default()
        };
        let prefs = sent(&request).await;
        assert_eq!(
            (
                prefs.min_healthy_percentage(),
                prefs.max_healthy_percentage(),
                prefs.bake_time()
            ),
            (Some(100), Some(200), Some(600))
        );
        // Unset: AWS's defaults (100, no bake), as before these settings existed.
        let prefs = sent(&RefreshRequest {
            min_healthy_percentage: 90,
            ..RefreshRequest::default()
        })
        .await;
        assert_eq!(
            (
                prefs.min_healthy_percentage(),
                prefs.max_healthy_percentage(),
                prefs.bake_time()
            ),
            (Some(90), None, None)
        );
    }
}
