//! What AWS holds, read through the SDK the way every end-to-end check reads it: the golden
//! parameter of an account and the AMIs a group's instances run. Shared by the e2e tests
//! (`support::reads`) and amictl's end-to-end tests (`crates/amictl/tests/ops.rs` includes this
//! file), so both judge a rollout by the same reads.

use aws_config::SdkConfig;

/// The golden parameter every local world publishes.
pub const PARAMETER: &str = "/golden/al2023/ami-id";

/// (value, version) of [`PARAMETER`] in the account `config` acts in.
pub async fn golden_parameter(config: &SdkConfig) -> (String, i64) {
    let p = aws_sdk_ssm::Client::new(config)
        .get_parameter()
        .name(PARAMETER)
        .send()
        .await
        .unwrap()
        .parameter
        .unwrap();
    (p.value.unwrap_or_default(), p.version)
}

/// The AMI of each of `group`'s instances (one entry per instance), read from Auto Scaling (the
/// members) and EC2 (their image).
pub async fn instance_amis(config: &SdkConfig, group: &str) -> Vec<String> {
    let groups = aws_sdk_autoscaling::Client::new(config)
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = groups.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    aws_sdk_ec2::Client::new(config)
        .describe_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect()
}
