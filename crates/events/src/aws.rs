//! AWS's own events that amiflow consumes, in the shapes AWS documents (samples in
//! `fixtures/valid/aws-*.json`). All are delivered best effort: consumers must not rely on every
//! state change arriving.

use serde::Deserialize;

/// An AWS service event amiflow understands.
#[derive(Debug, Clone, PartialEq)]
pub enum AwsEvent {
    AmiStateChange(AmiStateChange),
    ImageBuilderStateChange(ImageBuilderStateChange),
    InstanceRefresh(InstanceRefreshEvent),
}

/// EC2 "AMI State Change": CreateImage / CopyImage / RegisterImage moved an AMI to `state`.
#[derive(Debug, Clone, PartialEq)]
pub struct AmiStateChange {
    pub account: String,
    pub region: String,
    pub image_id: String,
    /// `pending`, `available`, `failed`, `deregistered`, `disabled`, ...
    pub state: String,
    pub error_message: String,
}

/// EC2 Image Builder "Image State Change". It carries no AMI id: the image ARN is resolved to
/// the AMI it produced through the `Ec2ImageBuilderArn` tag Image Builder puts on its AMIs.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBuilderStateChange {
    pub account: String,
    pub region: String,
    pub image_arn: String,
    /// `AVAILABLE`, `BUILDING`, `TESTING`, `FAILED`, ...
    pub status: String,
}

/// Which instance-refresh event Auto Scaling sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshEventKind {
    Started,
    CheckpointReached,
    Succeeded,
    Failed,
    Cancelled,
    RollbackStarted,
    RollbackSucceeded,
    RollbackFailed,
}

/// Every AWS event detail-type amiflow's rules route to its queues (`deploy/*.yaml`): the
/// instance-refresh outcomes and the two ways an AMI is announced as built.
pub const AWS_DETAIL_TYPES: [&str; 10] = [
    "EC2 Auto Scaling Instance Refresh Started",
    "EC2 Auto Scaling Instance Refresh Checkpoint Reached",
    "EC2 Auto Scaling Instance Refresh Succeeded",
    "EC2 Auto Scaling Instance Refresh Failed",
    "EC2 Auto Scaling Instance Refresh Cancelled",
    "EC2 Auto Scaling Instance Refresh Rollback Started",
    "EC2 Auto Scaling Instance Refresh Rollback Succeeded",
    "EC2 Auto Scaling Instance Refresh Rollback Failed",
    "EC2 AMI State Change",
    "EC2 Image Builder Image State Change",
];

impl RefreshEventKind {
    const PREFIX: &'static str = "EC2 Auto Scaling Instance Refresh ";

    fn from_detail_type(detail_type: &str) -> Option<Self> {
        Some(match detail_type.strip_prefix(Self::PREFIX)? {
            "Started" => Self::Started,
            "Checkpoint Reached" => Self::CheckpointReached,
            "Succeeded" => Self::Succeeded,
            "Failed" => Self::Failed,
            "Cancelled" => Self::Cancelled,
            "Rollback Started" => Self::RollbackStarted,
            "Rollback Succeeded" => Self::RollbackSucceeded,
            "Rollback Failed" => Self::RollbackFailed,
            _ => return None,
        })
    }

    /// Whether the refresh has ended with this event.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::Cancelled
                | Self::RollbackSucceeded
                | Self::RollbackFailed
        )
    }
}

/// An Auto Scaling instance-refresh event for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRefreshEvent {
    pub account: String,
    pub region: String,
    pub kind: RefreshEventKind,
    pub instance_refresh_id: String,
    pub asg_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AmiDetail {
    image_id: String,
    state: String,
    #[serde(default)]
    error_message: String,
}

#[derive(Deserialize)]
struct ImageBuilderDetail {
    state: ImageBuilderState,
}

#[derive(Deserialize)]
struct ImageBuilderState {
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RefreshDetail {
    instance_refresh_id: String,
    auto_scaling_group_name: String,
}

/// What went wrong parsing an AWS event.
pub(crate) enum AwsParseError {
    UnknownDetailType,
    Invalid(String),
}

pub(crate) fn parse(
    source: &str,
    detail_type: &str,
    account: &str,
    region: &str,
    resources: &[String],
    detail: serde_json::Value,
) -> Result<AwsEvent, AwsParseError> {
    let invalid = |e: serde_json::Error| AwsParseError::Invalid(e.to_string());
    match (source, detail_type) {
        ("aws.ec2", "EC2 AMI State Change") => {
            let d: AmiDetail = serde_json::from_value(detail).map_err(invalid)?;
            if !regex_ami(&d.image_id) {
                return Err(AwsParseError::Invalid(format!(
                    "ImageId {:?} is not an AMI id",
                    d.image_id
                )));
            }
            Ok(AwsEvent::AmiStateChange(AmiStateChange {
                account: account.to_owned(),
                region: region.to_owned(),
                image_id: d.image_id,
                state: d.state,
                error_message: d.error_message,
            }))
        }
        ("aws.imagebuilder", "EC2 Image Builder Image State Change") => {
            let d: ImageBuilderDetail = serde_json::from_value(detail).map_err(invalid)?;
            let image_arn = resources
                .iter()
                .find(|r| r.starts_with("arn:") && r.contains(":imagebuilder:"))
                .ok_or_else(|| {
                    AwsParseError::Invalid("resources holds no Image Builder image ARN".into())
                })?;
            Ok(AwsEvent::ImageBuilderStateChange(ImageBuilderStateChange {
                account: account.to_owned(),
                region: region.to_owned(),
                image_arn: image_arn.clone(),
                status: d.state.status,
            }))
        }
        ("aws.autoscaling", _) => {
            let kind = RefreshEventKind::from_detail_type(detail_type)
                .ok_or(AwsParseError::UnknownDetailType)?;
            let d: RefreshDetail = serde_json::from_value(detail).map_err(invalid)?;
            Ok(AwsEvent::InstanceRefresh(InstanceRefreshEvent {
                account: account.to_owned(),
                region: region.to_owned(),
                kind,
                instance_refresh_id: d.instance_refresh_id,
                asg_name: d.auto_scaling_group_name,
            }))
        }
        _ => Err(AwsParseError::UnknownDetailType),
    }
}

/// `ami-` followed by 8 or 17 lowercase hex digits.
pub(crate) fn regex_ami(id: &str) -> bool {
    id.strip_prefix("ami-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::AWS_DETAIL_TYPES;

    /// The list is the deployment's: every AWS detail-type a rule in `deploy/` routes, no other.
    #[test]
    fn the_aws_detail_types_are_those_the_deployed_rules_route() {
        let mut routed = std::collections::BTreeSet::new();
        for file in ["hub.yaml", "spoke.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy")
                .join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let line = line
                    .trim()
                    .trim_start_matches("- ")
                    .trim_start_matches("detail-type: ")
                    .trim_matches(|c| c == '[' || c == ']');
                if line.starts_with("EC2 ") {
                    routed.insert(line.to_owned());
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            AWS_DETAIL_TYPES.iter().map(|t| (*t).to_owned()).collect();
        assert_eq!(listed, routed);
    }
}
