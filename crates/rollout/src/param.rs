//! param-worker (spoke): write the shared AMI into this account's golden parameter, never
//! regressing it. The AMI must be visible here first; the write uses `DataType = aws:ec2:image`,
//! which AWS validates asynchronously, so the value is read back before `ParamUpdated` goes out.
//! An AMI the hub does not own, or of another family than the parameter's, is refused.

use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use chrono::{DateTime, Utc};
use events::{AmiRecalled, AmiShared, Detail, ParamUpdated};
use runtime::StepError;

use crate::aws::{Images, Keys, Parameters};
use crate::control::{Recall, Recalls, previous_golden};
use crate::policy::Policy;

/// Reading back after a write: AWS validates `aws:ec2:image` asynchronously.
pub const READ_BACK_ATTEMPTS: usize = 10;

pub async fn update_parameter(
    shared: &AmiShared,
    account: &str,
    policy: &Policy,
    images: &impl Images,
    keys: &impl Keys,
    params: &impl Parameters,
    read_back_interval: Duration,
) -> Result<Vec<Detail>, StepError> {
    let name = shared.parameter_name.as_str();
    // Visible from here? Sharing can take a moment to propagate: transient, then DLQ with reason.
    let new = images.describe(&shared.ami_id).await?.ok_or_else(|| {
        StepError::Transient(format!(
            "AMI {} is not visible from account {account}: was it shared with this account?",
            shared.ami_id
        ))
    })?;
    // Re-judged here, whatever the hub said: the hub's own AMI, of this parameter's family.
    if let Some(why) = policy.refuse_image(&new, name) {
        return Err(StepError::Permanent(why));
    }
    // Snapshots under a customer managed key: Auto Scaling launches here need a grant for this
    // account's Auto Scaling service-linked role, else they fail with Client.InternalError.
    let autoscaling_role = format!(
        "arn:aws:iam::{account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
    );
    for key in new.snapshots.iter().filter_map(|(_, key)| key.as_deref()) {
        keys.ensure_grant(key, &autoscaling_role, &format!("amiflow-autoscaling-{account}"))
            .await
            .map_err(|e| match e {
                StepError::Permanent(why) => StepError::Permanent(format!(
                    "AMI {} is encrypted with {key}, and this account cannot grant its Auto Scaling role the use of it ({why}); the key's policy (or the hub's grant) must allow kms:CreateGrant for account {account}",
                    shared.ami_id
                )),
                transient => transient,
            })?;
    }
    let current = params.get(name).await?;
    if let Some(current) = &current {
        if current.data_type != "aws:ec2:image" {
            return Err(StepError::Permanent(format!(
                "parameter {name} has DataType {:?}; amiflow only writes aws:ec2:image parameters (recreate it with --data-type aws:ec2:image)",
                current.data_type
            )));
        }
        // Already there, or holding an AMI created later (never regress): re-emit the truth.
        let newer = current.value != shared.ami_id
            && images
                .describe(&current.value)
                .await?
                .and_then(|existing| existing.created_at)
                .zip(new.created_at)
                .is_some_and(|(theirs, ours)| theirs > ours);
        if newer {
            tracing::info!(parameter = name, current = %current.value, offered = %shared.ami_id, "parameter holds a newer AMI; not regressing");
        }
        if newer || current.value == shared.ami_id {
            return Ok(vec![updated(
                shared,
                account,
                current.value.clone(),
                None,
                current.version,
            )]);
        }
    }
    let previous = current.as_ref().map(|c| c.value.clone());
    let p = write_and_confirm(
        params,
        name,
        &shared.ami_id,
        previous.as_deref(),
        read_back_interval,
    )
    .await?;
    Ok(vec![updated(shared, account, p.value, previous, p.version)])
}

/// Write `ami` into the parameter and read it back until it holds it (AWS validates
/// `aws:ec2:image` asynchronously).
async fn write_and_confirm(
    params: &impl Parameters,
    name: &str,
    ami: &str,
    previous: Option<&str>,
    read_back_interval: Duration,
) -> Result<crate::aws::ParamValue, StepError> {
    params.put_image(name, ami).await?;
    // Err(None) means "not there yet": retried; Err(Some(e)) is a real failure: stops at once.
    let confirmed = (|| async {
        match params.get(name).await {
            Ok(Some(p)) if p.value == ami => Ok(p),
            Ok(_) => Err(None),
            Err(e) => Err(Some(e)),
        }
    })
    .retry(
        ConstantBuilder::default()
            .with_delay(read_back_interval)
            .with_max_times(READ_BACK_ATTEMPTS),
    )
    .when(|e: &Option<StepError>| e.is_none())
    .await;
    match confirmed {
        Ok(p) => Ok(p),
        Err(Some(e)) => Err(e),
        Err(None) => Err(StepError::Permanent(format!(
            "parameter {name} did not keep {ami} (aws:ec2:image validation rejected it?); it still holds {}",
            previous.unwrap_or("nothing")
        ))),
    }
}

/// The one way a golden parameter goes back: a recalled AMI is replaced by the recall's `to`, or
/// by the stage's previous golden AMI that is not recalled ([`previous_golden`]). Only a parameter
/// that holds the recalled AMI changes (one new version); one that moved on, or never held it,
/// is left alone. Delivered again after the write, the move back's `ParamUpdated` is sent again
/// (the plan is level-triggered: it requests nothing twice).
///
/// `closes_at`: until when the plan may move groups back at once (`--now`); `None` waits for the
/// stage's window where its refreshes wait for one.
#[allow(clippy::too_many_arguments)]
pub async fn recall_parameter(
    recalled: &AmiRecalled,
    recall: &Recall,
    recalls: &Recalls,
    account: &str,
    images: &impl Images,
    params: &impl Parameters,
    read_back_interval: Duration,
    closes_at: Option<DateTime<Utc>>,
) -> Result<Vec<Detail>, StepError> {
    let name = recall.parameter.as_str();
    let Some(current) = params.get(name).await? else {
        tracing::info!(parameter = name, ami = %recall.ami, "no golden parameter here: nothing to move back");
        return Ok(Vec::new());
    };
    let history = params.history(name).await?;
    let back = |value: String, version: i64| {
        let mut p = ParamUpdated::new(
            &recalled.meta.key,
            account,
            name,
            &value,
            Some(recall.ami.clone()),
            version,
        );
        p.closes_at = closes_at;
        vec![Detail::from(p)]
    };
    if current.value != recall.ami {
        // The last write was this move back (its event may not have gone out): say it again.
        if history.len() >= 2 && history[history.len() - 2] == recall.ami {
            return Ok(back(current.value, current.version));
        }
        tracing::info!(parameter = name, holds = %current.value, ami = %recall.ami, "the parameter does not hold the recalled AMI: nothing to move back");
        return Ok(Vec::new());
    }
    let target = match &recall.to {
        Some(to) => to.clone(),
        None => previous_golden(&history, &recall.ami, recalls).ok_or_else(|| {
            StepError::Permanent(format!(
                "{name} in account {account} never held a golden AMI before {} that is not recalled: nothing to go back to; name one in the `to` field of the recall record {} (what `amictl recall --to` writes), then replay this message from the DLQ",
                recall.ami,
                crate::control::recall_path(&recall.ami)
            ))
        })?,
    };
    if images.describe(&target).await?.is_none() {
        return Err(StepError::Permanent(format!(
            "cannot move {name} back from the recalled {} to {target}: {target} is not visible from account {account} (deregistered or no longer shared)",
            recall.ami
        )));
    }
    let p = write_and_confirm(params, name, &target, Some(&recall.ami), read_back_interval).await?;
    tracing::warn!(parameter = name, recalled = %recall.ami, back_to = %p.value, version = p.version, "recalled AMI replaced: the golden parameter went back");
    Ok(back(p.value, p.version))
}

fn updated(
    shared: &AmiShared,
    account: &str,
    ami: String,
    previous: Option<String>,
    version: i64,
) -> Detail {
    let mut updated = ParamUpdated::new(
        &shared.meta.key,
        account,
        &shared.parameter_name,
        &ami,
        previous,
        version,
    );
    // Promoted at a window: the plan-worker plans in it.
    updated.closes_at = shared.closes_at;
    updated.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::{Image, ParamValue};
    use crate::fake::FakeAws;
    use chrono::{TimeZone, Utc};
    use events::{AmiBuilt, AmiRecalled};

    const NAME: &str = "/golden/al2023/ami-id";

    fn image(id: &str, month: u32) -> Image {
        Image {
            id: id.into(),
            name: format!("golden-al2023-2026-{month:02}"),
            owner: "111111111111".into(),
            created_at: Some(Utc.with_ymd_and_hms(2026, month, 1, 0, 0, 0).unwrap()),
            family_tag: None,
            tags: Default::default(),
            state: "available".into(),
            public: false,
            snapshots: vec![],
        }
    }

    fn shared(ami: &str, month: u32) -> AmiShared {
        let built = AmiBuilt::new(
            ami,
            "us-east-1",
            &format!("golden-al2023-2026-{month:02}"),
            Utc.with_ymd_and_hms(2026, month, 1, 0, 0, 0).unwrap(),
            NAME,
        );
        AmiShared::new(&built, "111111111111", "222222222222", "uat")
    }

    fn world(current: &str, data_type: &str) -> FakeAws {
        let aws = FakeAws::default();
        aws.images.lock().unwrap().insert(
            "ami-0000000000000000a".into(),
            image("ami-0000000000000000a", 10),
        );
        aws.images.lock().unwrap().insert(
            "ami-0000000000000000b".into(),
            image("ami-0000000000000000b", 11),
        );
        aws.params.lock().unwrap().insert(
            NAME.into(),
            ParamValue {
                value: current.into(),
                version: 3,
                data_type: data_type.into(),
            },
        );
        aws
    }

    const POLICY: &str = r#"
hub_account = "111111111111"
region = "us-east-1"
[[families]]
parameter_name = "/golden/al2023/ami-id"
name_prefix = "golden-al2023-"
[[families]]
parameter_name = "/golden/win2022/ami-id"
name_prefix = "golden-win2022-"
[[stages]]
name = "uat"
account = "222222222222"
window = { cron = "cron(0 2 ? * SAT#2 *)", duration_hours = 4 }
"#;

    async fn run(aws: &FakeAws, s: &AmiShared) -> Result<Vec<Detail>, StepError> {
        let policy = Policy::parse(POLICY).unwrap();
        update_parameter(
            s,
            "222222222222",
            &policy,
            aws,
            aws,
            aws,
            Duration::from_millis(1),
        )
        .await
    }

    /// The param-worker re-judges the AMI itself: a copy the hub does not own, or an AMI of
    /// another family (or of none), never reaches the parameter, whatever the event says.
    #[tokio::test]
    async fn an_ami_not_the_hubs_or_of_another_family_is_refused_before_any_write() {
        let aws = world("ami-0000000000000000a", "aws:ec2:image");
        let mut copy = image("ami-0000000000000000c", 11);
        copy.owner = "999999999999".into();
        let mut windows = image("ami-0000000000000000d", 11);
        windows.name = "golden-win2022-2026-11".into();
        let mut stranger = image("ami-0000000000000000e", 11);
        stranger.name = "ubuntu-24.04-2026-11".into();
        for i in [copy, windows, stranger] {
            aws.images.lock().unwrap().insert(i.id.clone(), i);
        }
        let cases = [
            (
                "ami-0000000000000000c",
                "AMI ami-0000000000000000c is owned by account 999999999999, not by the hub 111111111111: only the hub's own AMIs become golden; refused",
            ),
            (
                "ami-0000000000000000d",
                "AMI ami-0000000000000000d (golden-win2022-2026-11) is of the family of /golden/win2022/ami-id, not of /golden/al2023/ami-id; refused",
            ),
            (
                "ami-0000000000000000e",
                "AMI ami-0000000000000000e (ubuntu-24.04-2026-11) is of no golden family of the policy (no name prefix matches and it has no amiflow:family tag), so it cannot become the golden AMI of /golden/al2023/ami-id; refused",
            ),
        ];
        for (ami, why) in cases {
            let Err(StepError::Permanent(reason)) = run(&aws, &shared(ami, 11)).await else {
                panic!("{ami} must be refused for good");
            };
            assert_eq!(reason, why);
        }
        assert_eq!(
            aws.params.lock().unwrap()[NAME].value,
            "ami-0000000000000000a"
        );
        assert!(aws.changes().is_empty(), "{:?}", aws.changes());
    }

    fn param_updated(details: &[Detail]) -> &ParamUpdated {
        match details {
            [Detail::ParamUpdated(p)] => p,
            other => panic!("expected one ParamUpdated, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_newer_ami_is_written_and_read_back() {
        let aws = world("ami-0000000000000000a", "aws:ec2:image");
        let out = run(&aws, &shared("ami-0000000000000000b", 11))
            .await
            .unwrap();
        let p = param_updated(&out);
        assert_eq!(p.ami_id, "ami-0000000000000000b");
        assert_eq!(p.previous_ami_id.as_deref(), Some("ami-0000000000000000a"));
        assert_eq!(p.parameter_version, 4);
    }

    #[tokio::test]
    async fn an_older_or_the_same_ami_never_writes() {
        for (ami, month) in [("ami-0000000000000000a", 10), ("ami-0000000000000000b", 11)] {
            let aws = world("ami-0000000000000000b", "aws:ec2:image");
            let out = run(&aws, &shared(ami, month)).await.unwrap();
            let p = param_updated(&out);
            assert_eq!(
                p.ami_id, "ami-0000000000000000b",
                "the current truth is re-emitted"
            );
            assert_eq!(p.parameter_version, 3);
            assert!(aws.changes().is_empty(), "{:?}", aws.changes());
        }
    }

    #[tokio::test]
    async fn an_ami_not_visible_here_is_transient_and_named() {
        let aws = world("ami-0000000000000000a", "aws:ec2:image");
        let err = run(&aws, &shared("ami-00000000000000ccc", 11))
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(
            err.to_string()
                .contains("not visible from account 222222222222"),
            "{err}"
        );
        assert!(aws.changes().is_empty());
    }

    #[tokio::test]
    async fn an_ami_under_a_customer_managed_key_gets_a_grant_for_auto_scaling() {
        let aws = world("ami-0000000000000000a", "aws:ec2:image");
        let key = "arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        aws.images
            .lock()
            .unwrap()
            .get_mut("ami-0000000000000000b")
            .unwrap()
            .snapshots = vec![("snap-1".into(), Some(key.into()))];
        run(&aws, &shared("ami-0000000000000000b", 11))
            .await
            .unwrap();
        let changes = aws.changes();
        assert!(
            changes[0].starts_with(&format!("grant {key} arn:aws:iam::222222222222:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")),
            "{changes:?}"
        );
        // A key this account may not grant on: permanent, naming the key and the fix.
        let aws = world("ami-0000000000000000a", "aws:ec2:image");
        aws.images
            .lock()
            .unwrap()
            .get_mut("ami-0000000000000000b")
            .unwrap()
            .snapshots = vec![("snap-1".into(), Some(key.into()))];
        *aws.refuse_grants.lock().unwrap() = true;
        let err = run(&aws, &shared("ami-0000000000000000b", 11))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string().contains(key) && err.to_string().contains("kms:CreateGrant"),
            "{err}"
        );
        assert!(!aws.changes().iter().any(|c| c.starts_with("put_parameter")));
    }

    #[tokio::test]
    async fn a_parameter_of_another_data_type_is_refused_permanently() {
        let aws = world("ami-0000000000000000a", "text");
        let err = run(&aws, &shared("ami-0000000000000000b", 11))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("DataType \"text\""), "{err}");
        assert!(aws.changes().is_empty());
    }

    const A: &str = "ami-0000000000000000a";
    const B: &str = "ami-0000000000000000b";

    fn recall_of(ami: &str, to: Option<&str>) -> (AmiRecalled, Recall, Recalls) {
        let recall = Recall {
            decision: crate::control::Decision {
                by: "arn:aws:sts::111111111111:assumed-role/ops/alice".into(),
                at: Utc.with_ymd_and_hms(2026, 12, 5, 2, 0, 0).unwrap(),
                reason: "kernel regression".into(),
            },
            ami: ami.into(),
            parameter: NAME.into(),
            to: to.map(str::to_owned),
            now: false,
        };
        let mut recalls = Recalls::default();
        recalls.0.insert(ami.into(), recall.clone());
        let event = AmiRecalled::new(ami, NAME, "kernel regression", &recall.decision.by);
        (event, recall, recalls)
    }

    async fn recall(aws: &FakeAws, ami: &str, to: Option<&str>) -> Result<Vec<Detail>, StepError> {
        let (event, recall, recalls) = recall_of(ami, to);
        let closes = Utc.with_ymd_and_hms(2026, 12, 5, 6, 0, 0).unwrap();
        recall_parameter(
            &event,
            &recall,
            &recalls,
            "222222222222",
            aws,
            aws,
            Duration::from_millis(1),
            Some(closes),
        )
        .await
    }

    #[tokio::test]
    async fn a_recall_writes_the_previous_golden_ami_back_once() {
        let aws = world(B, "aws:ec2:image");
        aws.earlier_values
            .lock()
            .unwrap()
            .insert(NAME.into(), vec![A.into()]);
        let out = recall(&aws, B, None).await.unwrap();
        let p = param_updated(&out);
        assert_eq!(
            (
                p.ami_id.as_str(),
                p.previous_ami_id.as_deref(),
                p.parameter_version
            ),
            (A, Some(B), 4)
        );
        assert_eq!(p.meta.caused_by, format!("recalled:{B}"));
        assert_eq!(
            p.closes_at,
            Some(Utc.with_ymd_and_hms(2026, 12, 5, 6, 0, 0).unwrap())
        );
        assert_eq!(aws.changes(), [format!("put_parameter {NAME} {A}")]);
        // Delivered again: no second write, the move back's event is sent again.
        let again = recall(&aws, B, None).await.unwrap();
        assert_eq!(param_updated(&again).ami_id, A);
        assert_eq!(aws.changes().len(), 1, "{:?}", aws.changes());
    }

    #[tokio::test]
    async fn a_parameter_that_does_not_hold_the_recalled_ami_is_left_alone() {
        // Never held it (prod), or moved on to a later AMI.
        let aws = world(A, "aws:ec2:image");
        assert_eq!(recall(&aws, B, None).await.unwrap(), Vec::<Detail>::new());
        assert!(aws.changes().is_empty());
    }

    #[tokio::test]
    async fn the_only_golden_ami_needs_to_to_go_back() {
        let aws = world(B, "aws:ec2:image");
        let Err(StepError::Permanent(reason)) = recall(&aws, B, None).await else {
            panic!("nothing to go back to is permanent");
        };
        assert_eq!(
            reason,
            format!(
                "{NAME} in account 222222222222 never held a golden AMI before {B} that is not recalled: nothing to go back to; name one in the `to` field of the recall record /amiflow/control/recall/{B} (what `amictl recall --to` writes), then replay this message from the DLQ"
            )
        );
        assert!(aws.changes().is_empty());
        // Named by the operator: written.
        let out = recall(&aws, B, Some(A)).await.unwrap();
        assert_eq!(param_updated(&out).ami_id, A);
        assert_eq!(aws.changes(), [format!("put_parameter {NAME} {A}")]);
    }
}
