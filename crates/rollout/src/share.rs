//! share-worker (hub): make a new golden AMI usable from every target account: launch
//! permission, `createVolumePermission` on each snapshot, a KMS grant where the snapshots use a
//! customer managed key. Verified by reading back, then one `AmiShared` per account. Already
//! shared is success; the AMI owner's own account needs no permission but still gets its event.
//!
//! An AMI the hub does not own, or of another family than the parameter's (or of none), is
//! refused before anything is shared (`Policy::refuse_image`).
//!
//! An AMI that a target's param-worker would never promote (the target's golden parameter holds
//! a later AMI of the family) is refused before anything is shared: publishing it would hand every
//! stage an image it must not run, for nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{AmiBuilt, AmiShared, Detail, RolloutWindowOpened};
use runtime::StepError;

use crate::aws::{Ec2Images, Images, Keys, Parameters, Records, SsmParameters};
use crate::control::{self, Pauses, Promotion};
use crate::gate::{GateState, Stages, gates_of_stage};
use crate::policy::Policy;

/// A target account's golden AMI of a family, as the param-worker there sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Golden {
    pub ami: String,
    /// `None` when the AMI is not visible there (deregistered, unshared): it then cannot be
    /// compared, and the param-worker would not refuse on its account either.
    pub created_at: Option<DateTime<Utc>>,
}

/// Reads each target account's golden parameter from the hub.
pub trait Goldens: Send + Sync {
    /// The value of `parameter` in `account` and its AMI's creation date; `None` when the
    /// parameter does not exist there yet.
    fn golden(
        &self,
        account: &str,
        parameter: &str,
    ) -> impl Future<Output = Result<Option<Golden>, StepError>> + Send;
}

/// [`Goldens`] through the role the hub assumes in each stage account (its parameter and
/// `ec2:DescribeImages` are readable there, deploy/spoke.yaml `CrossAccountRole`). The clients of
/// each account are built on first use and kept.
pub struct AccountGoldens {
    clients: runtime::Clients,
    per_account: tokio::sync::Mutex<HashMap<String, (SsmParameters, Ec2Images)>>,
}

impl AccountGoldens {
    pub fn new(clients: runtime::Clients) -> Self {
        AccountGoldens {
            clients,
            per_account: tokio::sync::Mutex::default(),
        }
    }

    async fn reach(&self, account: &str) -> Result<(SsmParameters, Ec2Images), StepError> {
        let mut cache = self.per_account.lock().await;
        if let Some(found) = cache.get(account) {
            return Ok(found.clone());
        }
        let config =
            self.clients.for_account(account).await.map_err(|e| {
                StepError::Transient(format!("cannot act in account {account}: {e:#}"))
            })?;
        let made = (
            SsmParameters(aws_sdk_ssm::Client::new(&config)),
            Ec2Images(aws_sdk_ec2::Client::new(&config)),
        );
        cache.insert(account.to_owned(), made.clone());
        Ok(made)
    }
}

impl Goldens for AccountGoldens {
    async fn golden(&self, account: &str, parameter: &str) -> Result<Option<Golden>, StepError> {
        let (parameters, images) = self.reach(account).await?;
        let Some(value) = parameters.get(parameter).await? else {
            return Ok(None);
        };
        let created_at = images
            .describe(&value.value)
            .await?
            .and_then(|image| image.created_at);
        Ok(Some(Golden {
            ami: value.value,
            created_at,
        }))
    }
}

/// Share a built AMI with every target and promote the first stage to it.
pub async fn share(
    built: &AmiBuilt,
    images: &impl Images,
    keys: &impl Keys,
    goldens: &impl Goldens,
    records: &impl Records,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<Vec<Detail>, StepError> {
    let targets: Vec<&crate::policy::Stage> = match &built.targets {
        Some(accounts) if accounts.is_empty() => {
            return Err(StepError::Permanent(
                "targets is empty, so the AMI would reach no stage: name the stage accounts, or leave targets out for every stage; refused".into(),
            ));
        }
        Some(accounts) => {
            let mut chosen: Vec<&crate::policy::Stage> = Vec::new();
            for account in accounts {
                if chosen.iter().any(|s| &s.account == account) {
                    return Err(StepError::Permanent(format!(
                        "targets names account {account} more than once: name each stage account once; refused"
                    )));
                }
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
    if let Some(why) = policy.refuse_image(&image, &built.parameter_name) {
        return Err(StepError::Permanent(why));
    }
    // However the AmiBuilt came (ingest, a replay, `amictl inject`), the family's trust holds.
    if let Some(why) = policy
        .family_of(&image.name, image.family_tag.as_deref())
        .and_then(|f| f.untrusted(&image))
    {
        return Err(StepError::Permanent(why));
    }
    if image.state != "available" {
        return Err(StepError::Transient(format!(
            "AMI {} is {}, not available yet",
            built.ami_id, image.state
        )));
    }
    refuse_if_superseded(built, image.created_at, &targets, goldens).await?;
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
        // Only the first stage is promoted when the AMI is built; the gate promotes the others.
        if stage.name == policy.stages[0].name {
            promote(
                records,
                &built.ami_id,
                stage,
                &built.parameter_name,
                now,
                "the first stage is promoted when the AMI is built",
            )
            .await?;
            shared.push(AmiShared::new(built, &image.owner, account, &stage.name).into());
        }
    }
    Ok(shared)
}

/// Write the stage's promotion record for the AMI, unless it exists (the first one stays: it
/// says when the stage was promoted, which a bake counts from).
async fn promote(
    records: &impl Records,
    ami: &str,
    stage: &crate::policy::Stage,
    parameter: &str,
    now: DateTime<Utc>,
    reason: &str,
) -> Result<(), StepError> {
    let path = control::promotion_path(ami, &stage.name);
    if control::read::<Promotion>(records, &path).await?.is_some() {
        return Ok(());
    }
    control::write(
        records,
        &path,
        &Promotion {
            ami: ami.to_owned(),
            stage: stage.name.clone(),
            parameter: parameter.to_owned(),
            at: now,
            reason: reason.to_owned(),
        },
    )
    .await
}

/// A stage's window opened: for each family, promote the stage to the AMI the stage before holds
/// if its gate is open (or it was promoted and its parameter does not hold the AMI yet: the event
/// is sent again). Level-triggered: a replayed or forged window only makes the gate judged again.
pub async fn promote_at_window(
    window: &RolloutWindowOpened,
    images: &impl Images,
    stages: &impl Stages,
    records: &impl Records,
    pauses: &Pauses,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<Vec<Detail>, StepError> {
    let Some(stage) = policy.stage_for_account(&window.account) else {
        return Err(StepError::Permanent(format!(
            "window of account {} opened, which is not a stage of the rollout policy",
            window.account
        )));
    };
    if stage.name == policy.stages[0].name {
        // Promoted when the AMI is built; nothing to judge.
        return Ok(Vec::new());
    }
    if window.closes_at <= now {
        tracing::info!(stage = %stage.name, closed = %window.closes_at, "window already closed; no promotion");
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for gate in gates_of_stage(stages, records, pauses, policy, stage, now).await? {
        let Some(ami) = gate.ami.as_deref() else {
            tracing::info!(stage = %stage.name, parameter = %gate.parameter, gate = gate.state.kind(), reason = %gate.state, "gate closed: nothing to promote");
            continue;
        };
        if gate.reached {
            tracing::debug!(stage = %stage.name, parameter = %gate.parameter, %ami, "already holds the AMI (or a later one)");
            continue;
        }
        match &gate.state {
            GateState::Open { reason } => {
                promote(records, ami, stage, &gate.parameter, now, reason).await?;
                tracing::info!(stage = %stage.name, parameter = %gate.parameter, %ami, %reason, "gate open: stage promoted");
            }
            GateState::Promoted(p) => {
                tracing::info!(stage = %stage.name, parameter = %gate.parameter, %ami, promoted_at = %p.at, "promoted but the parameter does not hold the AMI yet: sent again");
            }
            closed => {
                tracing::info!(stage = %stage.name, parameter = %gate.parameter, %ami, gate = closed.kind(), reason = %closed, "gate closed: not promoted");
                continue;
            }
        }
        let image = images.describe(ami).await?.ok_or_else(|| {
            StepError::Transient(format!(
                "AMI {ami} (promoted to {}) is not visible in the hub",
                stage.name
            ))
        })?;
        let created_at = image
            .created_at
            .ok_or_else(|| StepError::Permanent(format!("AMI {ami} has no creation date")))?;
        let built = AmiBuilt::new(
            ami,
            &policy.region,
            &image.name,
            created_at,
            &gate.parameter,
        );
        let mut shared = AmiShared::new(&built, &image.owner, &stage.account, &stage.name);
        shared.meta.caused_by = window.meta.key.clone();
        shared.closes_at = Some(window.closes_at);
        out.push(shared.into());
    }
    Ok(out)
}

/// Refuse an AMI that is not newer than the golden AMI of some target: the param-worker there
/// would keep the later one (param.rs compares creation dates the same way), so sharing it would
/// only publish an image that is never promoted. The golden AMI itself passes: re-sharing what is
/// already published is idempotent.
async fn refuse_if_superseded(
    built: &AmiBuilt,
    created_at: Option<DateTime<Utc>>,
    targets: &[&crate::policy::Stage],
    goldens: &impl Goldens,
) -> Result<(), StepError> {
    let ours = created_at.unwrap_or(built.created_at);
    let mut later = Vec::new();
    for stage in targets {
        let Some(golden) = goldens
            .golden(&stage.account, &built.parameter_name)
            .await?
        else {
            continue;
        };
        if let Some(theirs) = golden
            .created_at
            .filter(|t| golden.ami != built.ami_id && *t > ours)
        {
            later.push(format!(
                "{} ({}) holds {} created {}",
                stage.name,
                stage.account,
                golden.ami,
                theirs.to_rfc3339()
            ));
        }
    }
    if later.is_empty() {
        return Ok(());
    }
    Err(StepError::Permanent(format!(
        "AMI {} (created {}) is older than the golden AMI of {}: {}; it would never be promoted there, so it is not shared",
        built.ami_id,
        ours.to_rfc3339(),
        built.parameter_name,
        later.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::aws::Image;
    use crate::fake::FakeAws;
    use chrono::TimeZone;

    const PARAMETER: &str = "/golden/al2023/ami-id";
    const HUB: &str = "111111111111";
    const POLICY: &str = r#"
hub_account = "111111111111"
region = "us-east-1"
[[families]]
parameter_name = "/golden/al2023/ami-id"
name_prefix = "golden-al2023-"
[[stages]]
name = "uat"
account = "222222222222"
window = { cron = "cron(0 2 ? * SAT#2 *)", duration_hours = 4 }
[[stages]]
name = "prod"
account = "333333333333"
window = { cron = "cron(0 2 ? * SAT#3 *)", duration_hours = 4 }
"#;

    fn month(m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, m, 1, 0, 0, 0).unwrap()
    }

    fn ami(m: u32) -> String {
        format!("ami-00000000000000{m:03}")
    }

    /// Golden parameter per target account.
    #[derive(Default)]
    struct FakeGoldens(HashMap<String, Golden>);

    impl Goldens for FakeGoldens {
        async fn golden(
            &self,
            account: &str,
            parameter: &str,
        ) -> Result<Option<Golden>, StepError> {
            assert_eq!(parameter, PARAMETER);
            Ok(self.0.get(account).cloned())
        }
    }

    fn goldens(per_account: &[(&str, u32)]) -> FakeGoldens {
        FakeGoldens(
            per_account
                .iter()
                .map(|(account, m)| {
                    (
                        (*account).to_owned(),
                        Golden {
                            ami: ami(*m),
                            created_at: Some(month(*m)),
                        },
                    )
                })
                .collect(),
        )
    }

    /// The hub's EC2 as far as sharing goes: one AMI, and the permissions added to it (read back
    /// as given, as AWS does once they propagate).
    struct Hub {
        image: Image,
        changes: Mutex<Vec<String>>,
    }

    impl Hub {
        fn changes(&self) -> Vec<String> {
            self.changes.lock().unwrap().clone()
        }

        fn granted(&self, kind: &str) -> Vec<String> {
            self.changes()
                .iter()
                .filter_map(|c| c.strip_prefix(kind))
                .filter_map(|rest| rest.rsplit(' ').next())
                .map(str::to_owned)
                .collect()
        }
    }

    impl Images for Hub {
        async fn describe(&self, ami: &str) -> Result<Option<Image>, StepError> {
            Ok((ami == self.image.id).then(|| self.image.clone()))
        }
        async fn built_by(&self, _arn: &str) -> Result<Option<Image>, StepError> {
            Ok(None)
        }
        async fn launch_permissions(&self, _ami: &str) -> Result<Vec<String>, StepError> {
            Ok(self.granted("add_launch_permission "))
        }
        async fn add_launch_permission(&self, ami: &str, account: &str) -> Result<(), StepError> {
            self.changes
                .lock()
                .unwrap()
                .push(format!("add_launch_permission {ami} {account}"));
            Ok(())
        }
        async fn snapshot_permissions(&self, _snapshot: &str) -> Result<Vec<String>, StepError> {
            Ok(self.granted("add_snapshot_permission "))
        }
        async fn add_snapshot_permission(
            &self,
            snapshot: &str,
            account: &str,
        ) -> Result<(), StepError> {
            self.changes
                .lock()
                .unwrap()
                .push(format!("add_snapshot_permission {snapshot} {account}"));
            Ok(())
        }
    }

    fn hub_with(m: u32) -> Hub {
        Hub {
            image: Image {
                id: ami(m),
                name: format!("golden-al2023-2026-{m:02}"),
                owner: HUB.into(),
                created_at: Some(month(m)),
                family_tag: None,
                tags: Default::default(),
                state: "available".into(),
                public: false,
                snapshots: vec![("snap-1".into(), None)],
            },
            changes: Mutex::default(),
        }
    }

    async fn run(hub: &Hub, goldens: &FakeGoldens, m: u32) -> Result<Vec<Detail>, StepError> {
        run_with(hub, goldens, m, &FakeAws::default()).await
    }

    async fn run_with(
        hub: &Hub,
        goldens: &FakeGoldens,
        m: u32,
        records: &FakeAws,
    ) -> Result<Vec<Detail>, StepError> {
        let policy = Policy::parse(POLICY).unwrap();
        let built = AmiBuilt::new(
            &ami(m),
            "us-east-1",
            &format!("golden-al2023-2026-{m:02}"),
            month(m),
            PARAMETER,
        );
        share(
            &built,
            hub,
            &FakeAws::default(),
            goldens,
            records,
            &policy,
            month(12),
        )
        .await
    }

    #[tokio::test]
    async fn an_ami_newer_than_every_golden_one_is_shared_with_every_stage() {
        let aws = hub_with(11);
        let out = run(
            &aws,
            &goldens(&[("222222222222", 10), ("333333333333", 9)]),
            11,
        )
        .await
        .unwrap();
        // Shared with both; only the first stage promoted.
        let [Detail::AmiShared(first)] = &out[..] else {
            panic!("one AmiShared, for the first stage: {out:?}");
        };
        assert_eq!((first.stage.as_str(), first.closes_at), ("uat", None));
        assert_eq!(
            aws.changes(),
            [
                "add_launch_permission ami-00000000000000011 222222222222",
                "add_snapshot_permission snap-1 222222222222",
                "add_launch_permission ami-00000000000000011 333333333333",
                "add_snapshot_permission snap-1 333333333333",
            ]
        );
    }

    #[tokio::test]
    async fn the_first_stage_promotion_is_recorded_once() {
        let aws = hub_with(11);
        let records = FakeAws::default();
        let goldens = goldens(&[]);
        run_with(&aws, &goldens, 11, &records).await.unwrap();
        let path = control::promotion_path(&ami(11), "uat");
        let first: Promotion = control::read(&records, &path).await.unwrap().unwrap();
        assert_eq!(
            (first.stage.as_str(), first.parameter.as_str(), first.at),
            ("uat", PARAMETER, month(12))
        );
        assert!(
            control::read::<Promotion>(&records, &control::promotion_path(&ami(11), "prod"))
                .await
                .unwrap()
                .is_none()
        );
        // Delivered again: the record (and the time a bake counts from) stays.
        run_with(&aws, &goldens, 11, &records).await.unwrap();
        assert_eq!(
            records.changes(),
            [format!("put_record {path}")],
            "written once"
        );
    }

    #[tokio::test]
    async fn the_golden_ami_itself_is_shared_again() {
        let aws = hub_with(10);
        let out = run(
            &aws,
            &goldens(&[("222222222222", 10), ("333333333333", 9)]),
            10,
        )
        .await
        .unwrap();
        assert_eq!(out.len(), 1, "already published is success: {out:?}");
    }

    /// An `AmiBuilt` for an AMI its family does not trust (injected, replayed, forged) is
    /// shared with no one, however it came.
    #[tokio::test]
    async fn an_ami_its_family_does_not_trust_is_shared_with_no_one() {
        let mut policy = Policy::parse(POLICY).unwrap();
        policy.families[0].approval_tag = Some("amiflow:approved".into());
        let hub = hub_with(11);
        let built = AmiBuilt::new(
            &ami(11),
            "us-east-1",
            "golden-al2023-2026-11",
            month(11),
            PARAMETER,
        );
        let records = FakeAws::default();
        let err = share(
            &built,
            &hub,
            &FakeAws::default(),
            &goldens(&[]),
            &records,
            &policy,
            month(12),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, StepError::Permanent(why) if why.contains("is not approved: tag it amiflow:approved=true")),
            "{err}"
        );
        assert!(hub.changes().is_empty(), "{:?}", hub.changes());
    }

    /// A copy of another account's AMI, or an AMI of another family, is shared with no one.
    #[tokio::test]
    async fn an_ami_not_the_hubs_or_of_another_family_is_shared_with_no_one() {
        let goldens = goldens(&[]);
        let mut copy = hub_with(11);
        copy.image.owner = "999999999999".into();
        let Err(StepError::Permanent(reason)) = run(&copy, &goldens, 11).await else {
            panic!("a copy the hub does not own must be refused for good");
        };
        assert_eq!(
            reason,
            format!(
                "AMI {} is owned by account 999999999999, not by the hub {HUB}: only the hub's own AMIs become golden; refused",
                ami(11)
            )
        );
        assert!(copy.changes().is_empty(), "{:?}", copy.changes());

        let mut other = hub_with(11);
        other.image.name = "ubuntu-24.04-2026-11".into();
        let Err(StepError::Permanent(reason)) = run(&other, &goldens, 11).await else {
            panic!("an AMI of no family must be refused for good");
        };
        assert!(
            reason.contains("is of no golden family of the policy"),
            "{reason}"
        );
        assert!(other.changes().is_empty(), "{:?}", other.changes());
    }

    /// A public AMI (the hub's own, made launchable by anyone) is shared with no one.
    #[tokio::test]
    async fn a_public_ami_is_shared_with_no_one() {
        let mut public = hub_with(11);
        public.image.public = true;
        let Err(StepError::Permanent(reason)) = run(&public, &goldens(&[]), 11).await else {
            panic!("a public AMI must be refused for good");
        };
        assert!(
            reason.starts_with(&format!(
                "AMI {} is public (anyone may launch it): a golden AMI is shared with the stage accounts only; make it private",
                ami(11)
            )),
            "{reason}"
        );
        assert!(public.changes().is_empty(), "{:?}", public.changes());
    }

    /// `targets` that names no stage, or a stage twice, is refused before anything is shared.
    #[tokio::test]
    async fn empty_or_repeated_targets_are_refused() {
        let policy = Policy::parse(POLICY).unwrap();
        let hub = hub_with(11);
        for (targets, want) in [
            (
                vec![],
                "targets is empty, so the AMI would reach no stage: name the stage accounts, or leave targets out for every stage; refused".to_owned(),
            ),
            (
                vec!["222222222222".to_owned(), "222222222222".to_owned()],
                "targets names account 222222222222 more than once: name each stage account once; refused".to_owned(),
            ),
        ] {
            let mut built = AmiBuilt::new(
                &ami(11),
                "us-east-1",
                "golden-al2023-2026-11",
                month(11),
                PARAMETER,
            );
            built.targets = Some(targets);
            let err = share(
                &built,
                &hub,
                &FakeAws::default(),
                &goldens(&[]),
                &FakeAws::default(),
                &policy,
                month(12),
            )
            .await
            .unwrap_err();
            let StepError::Permanent(reason) = err else {
                panic!("bad targets are refused for good: {err:?}");
            };
            assert_eq!(reason, want);
        }
        assert!(hub.changes().is_empty(), "{:?}", hub.changes());
    }

    #[tokio::test]
    async fn an_ami_older_than_a_golden_one_is_refused_before_anything_is_shared() {
        let aws = hub_with(9);
        let err = run(
            &aws,
            &goldens(&[("222222222222", 10), ("333333333333", 9)]),
            9,
        )
        .await
        .unwrap_err();
        let StepError::Permanent(reason) = &err else {
            panic!("an AMI that is never promoted is permanent: {err:?}");
        };
        assert_eq!(
            reason,
            "AMI ami-00000000000000009 (created 2026-09-01T00:00:00+00:00) is older than the golden AMI of /golden/al2023/ami-id: uat (222222222222) holds ami-00000000000000010 created 2026-10-01T00:00:00+00:00; it would never be promoted there, so it is not shared"
        );
        assert!(aws.changes().is_empty(), "{:?}", aws.changes());
    }

    #[tokio::test]
    async fn a_target_without_a_golden_ami_or_with_an_unreadable_one_does_not_refuse() {
        let aws = hub_with(9);
        let mut unreadable = goldens(&[]);
        unreadable.0.insert(
            "333333333333".into(),
            Golden {
                ami: ami(12),
                created_at: None,
            },
        );
        let out = run(&aws, &unreadable, 9).await.unwrap();
        assert_eq!(out.len(), 1);
    }

    /// Each stage account's groups and parameters, for the gate.
    struct Accounts(HashMap<String, FakeAws>);

    impl Stages for Accounts {
        type Groups = FakeAws;
        type Params = FakeAws;
        fn of(&self, account: &str) -> Result<(&FakeAws, &FakeAws), StepError> {
            let a = &self.0[account];
            Ok((a, a))
        }
    }

    fn holding(value: &str) -> FakeAws {
        let aws = FakeAws::default();
        aws.params.lock().unwrap().insert(
            PARAMETER.into(),
            crate::aws::ParamValue {
                value: value.into(),
                version: 2,
                data_type: "aws:ec2:image".into(),
            },
        );
        aws.earlier_values
            .lock()
            .unwrap()
            .insert(PARAMETER.into(), vec![ami(9)]);
        aws
    }

    #[tokio::test]
    async fn a_window_promotes_its_stage_only_through_an_open_gate() {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        let accounts = Accounts(
            [
                ("111111111111", holding(&ami(11))),
                ("222222222222", holding(&ami(10))),
                ("333333333333", holding(&ami(10))),
            ]
            .into_iter()
            .map(|(a, f)| (a.to_owned(), f))
            .collect(),
        );
        let hub = hub_with(11);
        let records = FakeAws::default();
        let now = month(12);
        let window = |account: &str, stage: &str, closes: DateTime<Utc>| {
            RolloutWindowOpened::new(account, stage, closes - chrono::Duration::hours(4), closes)
        };
        let promote = |w: RolloutWindowOpened, pauses: Pauses| {
            let (hub, accounts, records, policy) = (&hub, &accounts, &records, &policy);
            async move {
                promote_at_window(&w, hub, accounts, records, &pauses, policy, now)
                    .await
                    .unwrap()
            }
        };
        let uat_window = window("222222222222", "uat", now + chrono::Duration::hours(3));

        // Paused: closed, nothing recorded.
        let paused = Pauses {
            all: Some(control::Decision {
                by: "ops".into(),
                at: now,
                reason: "freeze".into(),
            }),
            stages: Vec::new(),
        };
        assert!(promote(uat_window.clone(), paused).await.is_empty());
        assert!(records.changes().is_empty(), "{:?}", records.changes());
        // A window already over (a late delivery) or the first stage's: nothing to judge.
        let over = window("222222222222", "uat", now - chrono::Duration::hours(1));
        assert!(promote(over, Pauses::default()).await.is_empty());
        let qa = window("111111111111", "qa", now + chrono::Duration::hours(3));
        assert!(promote(qa, Pauses::default()).await.is_empty());
        // prod: uat does not hold the AMI qa holds; prod holds what uat holds.
        let prod = window("333333333333", "prod", now + chrono::Duration::hours(3));
        assert!(promote(prod, Pauses::default()).await.is_empty());
        assert!(records.changes().is_empty(), "{:?}", records.changes());

        // qa passed (it has no groups): uat is promoted, in its window.
        let out = promote(uat_window.clone(), Pauses::default()).await;
        let [Detail::AmiShared(shared)] = &out[..] else {
            panic!("one AmiShared for uat: {out:?}");
        };
        assert_eq!(
            (
                shared.ami_id.as_str(),
                shared.target_account.as_str(),
                shared.stage.as_str(),
                shared.closes_at,
                shared.meta.caused_by.as_str()
            ),
            (
                ami(11).as_str(),
                "222222222222",
                "uat",
                Some(uat_window.closes_at),
                uat_window.meta.key.as_str()
            )
        );
        let recorded: Promotion =
            control::read(&records, &control::promotion_path(&ami(11), "uat"))
                .await
                .unwrap()
                .unwrap();
        assert!(
            recorded.reason.starts_with("qa passed "),
            "{}",
            recorded.reason
        );
        // Once uat holds it, its windows promote nothing.
        accounts.0["222222222222"]
            .put_image(PARAMETER, &ami(11))
            .await
            .unwrap();
        assert!(promote(uat_window, Pauses::default()).await.is_empty());
    }
}
