//! The one fixture of the emulator tests: a private emulator (refresh phase 300 ms) and the Rust
//! SDK clients acting in its default account, with the helpers that read a group, its members and
//! its refreshes as the SDK deserialises them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::{
    AutoScalingGroup, DesiredConfiguration, InstanceRefresh, LaunchTemplateSpecification,
    RefreshPreferences, RefreshStrategy, Tag,
};
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use aws_sdk_ssm::types::ParameterType;
use e2e::Local;

#[path = "../support/make.rs"]
mod make;

pub const WAIT: Duration = Duration::from_secs(60);
/// The emulator's refresh phase length (emulator::Options::default().refresh_step).
pub const STEP: Duration = Duration::from_millis(300);
pub const ACTIVE: [&str; 5] = [
    "Pending",
    "InProgress",
    "Baking",
    "Cancelling",
    "RollbackInProgress",
];
const IMAGE: &str = "aws:ec2:image";

/// A private emulator and clients acting in its default account.
pub async fn emulator() -> (Local, Clients) {
    let local = Local::start().await;
    let clients = Clients::new(&local.config);
    (local, clients)
}

pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub asg: aws_sdk_autoscaling::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub cfn: aws_sdk_cloudformation::Client,
}

impl Clients {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            ec2: aws_sdk_ec2::Client::new(config),
            asg: aws_sdk_autoscaling::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            cfn: aws_sdk_cloudformation::Client::new(config),
        }
    }

    pub async fn register(&self, name: &str) -> String {
        make::image(&self.ec2, name, None).await
    }

    /// A launch template whose version 1 runs `ami` on t3.micro; returns its id.
    pub async fn template(&self, name: &str, ami: &str) -> String {
        make::launch_template(&self.ec2, name, ami).await
    }

    /// A new version from `source` with only the ImageId changed; returns its number.
    pub async fn version_from(&self, lt: &str, source: &str, ami: &str) -> i64 {
        self.ec2
            .create_launch_template_version()
            .launch_template_id(lt)
            .source_version(source)
            .launch_template_data(RequestLaunchTemplateData::builder().image_id(ami).build())
            .send()
            .await
            .unwrap()
            .launch_template_version()
            .unwrap()
            .version_number()
            .unwrap()
    }

    pub async fn group_on(
        &self,
        name: &str,
        size: i32,
        lt: &str,
        version: &str,
        tags: &[(&str, &str)],
    ) {
        let mut req = self
            .asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .min_size(0)
            .max_size(10)
            .desired_capacity(size)
            .availability_zones("us-east-1a")
            .launch_template(lt_spec(lt, version));
        for (k, v) in tags {
            req = req.tags(
                Tag::builder()
                    .key(*k)
                    .value(*v)
                    .propagate_at_launch(false)
                    .resource_id(name)
                    .resource_type("auto-scaling-group")
                    .build(),
            );
        }
        req.send().await.unwrap();
    }

    pub async fn group(&self, name: &str) -> AutoScalingGroup {
        self.asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()
            .first()
            .unwrap_or_else(|| panic!("group {name} exists"))
            .clone()
    }

    /// The group's members as EC2 and Auto Scaling report them.
    pub async fn members(&self, group: &str) -> BTreeMap<String, Member> {
        let g = self.group(group).await;
        let reported: BTreeMap<String, Option<String>> = g
            .instances()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    i.launch_template()
                        .and_then(|t| t.version())
                        .map(str::to_owned),
                )
            })
            .collect();
        if reported.is_empty() {
            return BTreeMap::new();
        }
        let mut out = BTreeMap::new();
        for (id, i) in self.instances(reported.keys().cloned().collect()).await {
            out.insert(
                id.clone(),
                Member {
                    image: i.image,
                    reported_version: reported[&id].clone(),
                    version_tag: i.tags.get("aws:ec2launchtemplate:version").cloned(),
                    instance_type: i.instance_type,
                    state: i.state,
                },
            );
        }
        out
    }

    pub async fn instances(&self, ids: Vec<String>) -> BTreeMap<String, Ec2Instance> {
        let out = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    Ec2Instance {
                        image: i.image_id().unwrap_or_default().to_owned(),
                        instance_type: i
                            .instance_type()
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                        state: i
                            .state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_owned())
                            .unwrap_or_default(),
                        tags: i
                            .tags()
                            .iter()
                            .map(|t| {
                                (
                                    t.key().unwrap_or_default().to_owned(),
                                    t.value().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect(),
                    },
                )
            })
            .collect()
    }

    pub async fn start_refresh(
        &self,
        group: &str,
        desired: Option<(&str, &str)>,
        preferences: Option<RefreshPreferences>,
    ) -> String {
        self.asg
            .start_instance_refresh()
            .auto_scaling_group_name(group)
            .strategy(RefreshStrategy::Rolling)
            .set_desired_configuration(desired.map(|(lt, v)| {
                DesiredConfiguration::builder()
                    .launch_template(lt_spec(lt, v))
                    .build()
            }))
            .set_preferences(preferences)
            .send()
            .await
            .unwrap()
            .instance_refresh_id()
            .unwrap()
            .to_owned()
    }

    pub async fn refresh(&self, group: &str, id: &str) -> InstanceRefresh {
        let out = self
            .asg
            .describe_instance_refreshes()
            .auto_scaling_group_name(group)
            .instance_refresh_ids(id)
            .send()
            .await
            .unwrap();
        assert_eq!(out.instance_refreshes().len(), 1, "{out:?}");
        out.instance_refreshes()[0].clone()
    }

    /// Poll a refresh (every 20 ms, deadline WAIT) until `until` holds, recording each distinct
    /// (Status, PercentageComplete) seen. Returns the history and the last description.
    pub async fn watch(
        &self,
        group: &str,
        id: &str,
        until: impl Fn(&InstanceRefresh) -> bool,
    ) -> (Vec<(String, i32)>, InstanceRefresh) {
        let deadline = Instant::now() + WAIT;
        let mut seen: Vec<(String, i32)> = Vec::new();
        loop {
            let item = self.refresh(group, id).await;
            let state = (status(&item), item.percentage_complete().unwrap_or(-1));
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            if until(&item) {
                return (seen, item);
            }
            assert!(
                Instant::now() < deadline,
                "refresh {id} of {group} still going after {WAIT:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn until_done(&self, group: &str, id: &str) -> (Vec<(String, i32)>, InstanceRefresh) {
        self.watch(group, id, |r| !ACTIVE.contains(&status(r).as_str()))
            .await
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub image: String,
    pub reported_version: Option<String>,
    pub version_tag: Option<String>,
    pub instance_type: String,
    pub state: String,
}

#[derive(Debug, Clone)]
pub struct Ec2Instance {
    pub image: String,
    pub instance_type: String,
    pub state: String,
    pub tags: BTreeMap<String, String>,
}

pub fn lt_spec(lt: &str, version: &str) -> LaunchTemplateSpecification {
    let spec = LaunchTemplateSpecification::builder().version(version);
    if lt.starts_with("lt-") {
        spec.launch_template_id(lt).build()
    } else {
        spec.launch_template_name(lt).build()
    }
}

pub fn status(r: &InstanceRefresh) -> String {
    r.status()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

/// Distinct statuses in order of appearance.
pub fn statuses(seen: &[(String, i32)]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for (s, _) in seen {
        if out.last() != Some(&s.as_str()) {
            out.push(s);
        }
    }
    out
}

/// (image, reported version, EC2 version tag) of every member, deduplicated.
pub fn launch_facts(members: &BTreeMap<String, Member>) -> BTreeSet<(String, String, String)> {
    members
        .values()
        .map(|m| {
            (
                m.image.clone(),
                m.reported_version.clone().unwrap_or_default(),
                m.version_tag.clone().unwrap_or_default(),
            )
        })
        .collect()
}

pub fn facts(image: &str, reported: &str, tag: &str) -> BTreeSet<(String, String, String)> {
    BTreeSet::from([(image.to_owned(), reported.to_owned(), tag.to_owned())])
}

pub fn group_lt_version(g: &AutoScalingGroup) -> Option<String> {
    g.launch_template()
        .and_then(|t| t.version())
        .map(str::to_owned)
}

pub async fn put_image_param(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    value: &str,
    overwrite: bool,
) -> Result<
    i64,
    aws_sdk_ssm::error::SdkError<aws_sdk_ssm::operation::put_parameter::PutParameterError>,
> {
    ssm.put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::String)
        .data_type(IMAGE)
        .overwrite(overwrite)
        .send()
        .await
        .map(|o| o.version())
}
