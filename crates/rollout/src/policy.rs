//! The rollout policy: one TOML file (`AMIFLOW_CONFIG`) describing the hub, the golden AMI
//! families and, per stage, its account, maintenance window and safety limits. Validated at start;
//! every error names the field and what would be accepted.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// What to do with a group owned by a CloudFormation stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloudFormationMode {
    /// `UpdateStack` with the previous template and values when the stack takes the AMI through
    /// an SSM parameter type (re-resolves it); otherwise skip with the reason.
    UpdateStack,
    /// Never touch stack-owned groups; report them skipped.
    Skip,
}

/// What a later window does with a group whose refresh was superseded by a hand-made change
/// (its `$Default` version set by hand while amiflow refreshed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandMadeChanges {
    /// Leave the group as the operator set it, and report it skipped with the reason, until the
    /// next golden AMI.
    #[default]
    Respect,
    /// Move the group again next window (the worker logs what it undoes).
    Override,
}

/// The longest a maintenance window may stay open; the workers refuse a window event that
/// claims longer.
pub const MAX_WINDOW_HOURS: u32 = 24;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// EventBridge Scheduler expression, e.g. `cron(0 2 ? * SAT#1 *)` (1st Saturday, 02:00).
    pub cron: String,
    /// How long the window stays open; refreshes not started by then are skipped.
    pub duration_hours: u32,
}

impl Window {
    /// The window's schedule as EventBridge Scheduler reads `cron(...)`: `minute hour
    /// day-of-month month day-of-week year` in UTC, one of the two day fields `?`, days of the
    /// week 1 (Sunday) to 7 or `SUN`-`SAT`, with `L`, `W` and `#`.
    fn schedule(&self) -> Result<croner::Cron, String> {
        let fields = self
            .cron
            .strip_prefix("cron(")
            .and_then(|c| c.strip_suffix(')'))
            .ok_or("it is not of the form cron(...)")?;
        let parts: Vec<&str> = fields.split_whitespace().collect();
        if parts.len() != 6 {
            return Err(format!(
                "it has {} fields, not 6 (minute hour day-of-month month day-of-week year)",
                parts.len()
            ));
        }
        if (parts[2] == "?") == (parts[4] == "?") {
            return Err(
                "exactly one of day-of-month and day-of-week must be `?` (EventBridge Scheduler refuses both or neither)"
                    .into(),
            );
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Required)
            .alternative_weekdays(true)
            .build()
            .parse(&format!("0 {fields}"))
            .map_err(|e| e.to_string())
    }

    /// When the window opens next, strictly after `now` (`None`: never again, e.g. its years
    /// are past).
    pub fn next_opening(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule().ok()?.find_next_occurrence(&now, false).ok()
    }

    /// When the window open at `now` opened, if one is open.
    pub fn open_since(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let opened = self
            .schedule()
            .ok()?
            .find_previous_occurrence(&now, true)
            .ok()?;
        (now < opened + chrono::Duration::hours(i64::from(self.duration_hours))).then_some(opened)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub account: String,
    pub window: Window,
    /// `true`: a parameter update only plans refreshes when the window opens. `false`: refresh
    /// as soon as the parameter changes.
    #[serde(default = "yes")]
    pub refresh_waits_for_window: bool,
    /// How many instance refreshes may be in flight at once in the stage's account: a slot is
    /// held from the start until the refresh is closed (its outcome checked and marked), so no
    /// other request for the group starts while its close checks it or puts a default back.
    #[serde(default = "five")]
    pub max_concurrent_refreshes: u32,
    #[serde(default = "ninety")]
    pub min_healthy_percentage: i32,
    #[serde(default = "skip_tag")]
    pub skip_tag: String,
    #[serde(default = "update_stack")]
    pub cloudformation: CloudFormationMode,
    /// CloudWatch alarm names that fail (and roll back) a refresh.
    #[serde(default)]
    pub alarms: Vec<String>,
    /// Instance-refresh checkpoints in percent (each followed by a pause of `checkpoint_delay_seconds`).
    #[serde(default)]
    pub checkpoints: Vec<i32>,
    #[serde(default)]
    pub checkpoint_delay_seconds: Option<i32>,
    /// Pin `$Latest`/`$Default` groups to the new version number so the refresh can roll back.
    #[serde(default)]
    pub pin_unpinned_groups: bool,
    /// `respect` (default) or `override` a hand-made change that superseded a refresh.
    #[serde(default)]
    pub hand_made_changes: HandMadeChanges,
    /// The most of the group's desired capacity a refresh may run at once, in percent (100 to
    /// 200; AWS's default, 100, when absent). Above 100 new instances launch before old ones are
    /// terminated (capacity never drops below `min_healthy_percentage`, at the cost of extra
    /// instances for a while); AWS refuses more than 100 points above `min_healthy_percentage`.
    #[serde(default)]
    pub max_healthy_percentage: Option<i32>,
    /// How long, in seconds, a refresh waits after its last replacement before AWS calls it
    /// successful (its `BakeTime`, 0 to 172800): alarms can still fail and roll it back meanwhile.
    /// Per refresh; not the wait between stages.
    #[serde(default)]
    pub bake_time_seconds: Option<i32>,
    /// How many of the stage's groups of a family may fail or roll back an AMI before the stage
    /// halts for it (and the next stage stays closed): a count (`2`) or a percentage of the
    /// stage's groups of the family (`"10%"`, rounded down). Default 0: the first failure halts.
    #[serde(default)]
    pub max_failed_groups: FailureTolerance,
    /// How long the stage runs an AMI, after its last refresh ended, before the next stage may be
    /// promoted to it. Default 0.
    #[serde(default)]
    pub bake_hours: f64,
    /// The stage is promoted to an AMI only once an operator approved it (`amictl approve`).
    #[serde(default)]
    pub requires_approval: bool,
}

/// A stage's failure tolerance ([`Stage::max_failed_groups`]).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "ToleranceWire")]
pub enum FailureTolerance {
    Groups(u32),
    /// A percentage of the stage's groups of the family, 0 to 100.
    Percent(f64),
}

impl Default for FailureTolerance {
    fn default() -> Self {
        FailureTolerance::Groups(0)
    }
}

impl FailureTolerance {
    /// The failed groups allowed among `groups` groups.
    pub fn allowed(self, groups: usize) -> usize {
        match self {
            FailureTolerance::Groups(n) => n as usize,
            FailureTolerance::Percent(p) => (groups as f64 * p / 100.0).floor() as usize,
        }
    }
}

impl std::fmt::Display for FailureTolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureTolerance::Groups(n) => write!(f, "{n}"),
            FailureTolerance::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToleranceWire {
    Count(i64),
    Text(String),
}

impl TryFrom<ToleranceWire> for FailureTolerance {
    type Error = String;
    fn try_from(w: ToleranceWire) -> Result<Self, String> {
        const HOW: &str = "max_failed_groups must be a count of groups (0 or more, e.g. 2) or a percentage of the stage's groups as a string (e.g. \"10%\")";
        match w {
            ToleranceWire::Count(n) => u32::try_from(n)
                .map(FailureTolerance::Groups)
                .map_err(|_| format!("{HOW}, not {n}")),
            ToleranceWire::Text(t) => t
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .filter(|p| (0.0..=100.0).contains(p))
                .map(FailureTolerance::Percent)
                .ok_or_else(|| format!("{HOW}, not {t:?}")),
        }
    }
}

/// The longest bake amiflow accepts: 30 days.
pub const MAX_BAKE_HOURS: f64 = 720.0;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub parameter_name: String,
    pub name_prefix: String,
    /// Image Builder images (ARN prefixes, `arn:aws:imagebuilder:<region>:<account>:image/<name>/`)
    /// whose output ingest may roll out without an approval. Empty with no `approval_tag`: every
    /// hub AMI of the family is trusted (the policy says nothing).
    #[serde(default)]
    pub trusted_builds: Vec<String>,
    /// A tag that trusts an AMI by hand: the AMI carries it with the value `true` (set by
    /// whoever may approve images, `aws ec2 create-tags`).
    #[serde(default)]
    pub approval_tag: Option<String>,
}

impl Family {
    /// Why ingest may not start a rollout of `image` for this family, if it may not: the family
    /// names trusted builds or an approval tag, and the image is neither from one of those builds
    /// (its `Ec2ImageBuilderArn` tag) nor tagged approved.
    pub fn untrusted(&self, image: &crate::aws::Image) -> Option<String> {
        if self.trusted_builds.is_empty() && self.approval_tag.is_none() {
            return None;
        }
        let build = image.tags.get(crate::aws::IMAGE_BUILDER_TAG);
        if build.is_some_and(|b| {
            self.trusted_builds
                .iter()
                .any(|t| b.starts_with(t.as_str()))
        }) {
            return None;
        }
        if let Some(tag) = &self.approval_tag
            && image.tags.get(tag).is_some_and(|v| v == "true")
        {
            return None;
        }
        let made_by = match build {
            Some(b) => format!("was made by Image Builder image {b}, which is not a trusted build"),
            None => "was not made by Image Builder".to_owned(),
        };
        let fix = match (&self.approval_tag, self.trusted_builds.is_empty()) {
            (Some(tag), true) => format!("tag it {tag}=true to approve it"),
            (Some(tag), false) => format!(
                "build it with a trusted build ({}) or tag it {tag}=true to approve it",
                self.trusted_builds.join(", ")
            ),
            (None, _) => format!(
                "build it with a trusted build ({}), or add its image to trusted_builds",
                self.trusted_builds.join(", ")
            ),
        };
        Some(format!(
            "AMI {} ({}) of {} {made_by} and is not approved: {fix}, then replay this message (amictl dlq replay); refused",
            image.id, image.name, self.parameter_name
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub hub_account: String,
    pub region: String,
    #[serde(default)]
    pub role_name: Option<String>,
    pub families: Vec<Family>,
    pub stages: Vec<Stage>,
    /// What `amictl recall --disable-image` does to the recalled AMI in the hub.
    #[serde(default)]
    pub recalled_image: RecalledImage,
}

/// How a recalled AMI is taken out of use in the hub (its launch permissions go either way, so
/// no other account launches it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecalledImage {
    /// `ec2:DisableImage`: nothing launches from it, in the hub either, until it is enabled.
    #[default]
    Disable,
    /// `ec2:EnableImageDeprecation` from the next minute: it leaves listings and searches, and
    /// still launches by its id in the hub (for those who must not lose the ability to scale).
    Deprecate,
}

fn yes() -> bool {
    true
}
fn five() -> u32 {
    5
}
fn ninety() -> i32 {
    90
}
fn skip_tag() -> String {
    "amiflow:skip".into()
}
fn update_stack() -> CloudFormationMode {
    CloudFormationMode::UpdateStack
}

/// AWS's bounds for `BakeTime` (RefreshPreferences: 0 to 172800 seconds, two days).
pub const MAX_BAKE_TIME_SECONDS: i32 = 172_800;

impl Stage {
    /// The refresh preferences AWS would refuse at `StartInstanceRefresh`, found at start instead,
    /// with the fix.
    fn validate_refresh_preferences(&self) -> Result<(), String> {
        if let Some(max) = self.max_healthy_percentage {
            let min = self.min_healthy_percentage;
            // 100 or more is never below min_healthy_percentage (at most 100).
            if !(100..=200).contains(&max) {
                return Err(format!(
                    "max_healthy_percentage = {max} is outside 100 to 200: use 100 to replace instances one batch at a time, up to 200 to launch every replacement before terminating"
                ));
            }
            if max - min > 100 {
                return Err(format!(
                    "max_healthy_percentage = {max} is more than 100 above min_healthy_percentage = {min}, which AWS refuses: lower it to {} or raise min_healthy_percentage to {}",
                    min + 100,
                    max - 100
                ));
            }
        }
        if let Some(bake) = self.bake_time_seconds
            && !(0..=MAX_BAKE_TIME_SECONDS).contains(&bake)
        {
            return Err(format!(
                "bake_time_seconds = {bake} is outside 0 to {MAX_BAKE_TIME_SECONDS} (two days), what AWS accepts as a refresh's BakeTime"
            ));
        }
        Ok(())
    }
}

/// A policy file that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the rollout policy {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the rollout policy {path} is not valid TOML for amiflow: {message}")]
    Parse { path: String, message: String },
    #[error("the rollout policy {path}: {message}")]
    Invalid { path: String, message: String },
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

impl Policy {
    /// Read and validate the file named by `AMIFLOW_CONFIG`.
    pub fn from_env() -> anyhow::Result<Self> {
        let path = runtime::config::required_var(
            "AMIFLOW_CONFIG",
            "the path of the rollout policy TOML file",
        )?;
        Ok(Self::load(Path::new(&path))?)
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            PolicyError::Parse { message, .. } => PolicyError::Parse {
                path: shown.clone(),
                message,
            },
            PolicyError::Invalid { message, .. } => PolicyError::Invalid {
                path: shown.clone(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: String::new(),
            message: e.to_string(),
        })?;
        policy.validate().map_err(|message| PolicyError::Invalid {
            path: String::new(),
            message,
        })?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), String> {
        if !is_account(&self.hub_account) {
            return Err(format!(
                "hub_account {:?} is not a 12-digit account id",
                self.hub_account
            ));
        }
        if self.families.is_empty() {
            return Err("families is empty: name at least one golden parameter ([[families]] parameter_name, name_prefix)".into());
        }
        for f in &self.families {
            if !f.parameter_name.starts_with('/') || f.name_prefix.is_empty() {
                return Err(format!(
                    "family {:?}: parameter_name must start with '/' and name_prefix must not be empty",
                    f.parameter_name
                ));
            }
            for t in &f.trusted_builds {
                let parts: Vec<&str> = t.splitn(6, ':').collect();
                if parts.len() < 6
                    || parts[0] != "arn"
                    || parts[2] != "imagebuilder"
                    || !parts[5].starts_with("image/")
                    || parts[5].len() <= "image/".len()
                {
                    return Err(format!(
                        "family {:?}: trusted_builds entry {t:?} is not an Image Builder image ARN prefix (arn:aws:imagebuilder:<region>:<account>:image/<name>/)",
                        f.parameter_name
                    ));
                }
            }
            if let Some(tag) = &f.approval_tag
                && (tag.trim().is_empty() || tag.starts_with("aws:") || tag.len() > 128)
            {
                return Err(format!(
                    "family {:?}: approval_tag {tag:?} must be a tag key of 1 to 128 characters, not starting with aws:",
                    f.parameter_name
                ));
            }
        }
        if self.stages.is_empty() {
            return Err(
                "stages is empty: add at least one [[stages]] with name and account".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.stages {
            let at = format!("stage {:?}", s.name);
            if s.name.is_empty()
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!(
                    "{at}: name must be lowercase letters, digits and '-'"
                ));
            }
            if !seen.insert(s.account.clone()) {
                return Err(format!(
                    "{at}: account {} is already used by another stage",
                    s.account
                ));
            }
            if !is_account(&s.account) {
                return Err(format!(
                    "{at}: account {:?} is not a 12-digit account id",
                    s.account
                ));
            }
            if let Err(why) = s.window.schedule() {
                return Err(format!(
                    "{at}: window.cron {:?} is not an EventBridge Scheduler cron: {why}; e.g. \"cron(0 2 ? * SAT#1 *)\" (the first Saturday of each month, 02:00 UTC)",
                    s.window.cron
                ));
            }
            if s.window.duration_hours == 0 || s.window.duration_hours > MAX_WINDOW_HOURS {
                return Err(format!(
                    "{at}: window.duration_hours must be 1 to {MAX_WINDOW_HOURS}"
                ));
            }
            if s.max_concurrent_refreshes == 0 {
                return Err(format!("{at}: max_concurrent_refreshes must be at least 1"));
            }
            if !(0..=100).contains(&s.min_healthy_percentage) {
                return Err(format!("{at}: min_healthy_percentage must be 0 to 100"));
            }
            s.validate_refresh_preferences()
                .map_err(|why| format!("{at}: {why}"))?;
            if s.checkpoints.iter().any(|c| !(1..=100).contains(c)) || !s.checkpoints.is_sorted() {
                return Err(format!(
                    "{at}: checkpoints must be ascending percentages from 1 to 100"
                ));
            }
            if s.requires_approval && std::ptr::eq(s, &self.stages[0]) {
                return Err(format!(
                    "{at}: requires_approval: the first stage is promoted when the AMI is built; require the approval on a later stage, or pause the first one (amictl pause --stage {})",
                    s.name
                ));
            }
            if !(0.0..=MAX_BAKE_HOURS).contains(&s.bake_hours) {
                return Err(format!(
                    "{at}: bake_hours = {} must be from 0 to {MAX_BAKE_HOURS} (30 days); 0.5 is half an hour",
                    s.bake_hours
                ));
            }
        }
        Ok(())
    }

    pub fn stage_for_account(&self, account: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.account == account)
    }

    pub fn stage_named(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stage before `name` in rollout order (`None` for the first stage, or an unknown one).
    pub fn stage_before(&self, name: &str) -> Option<&Stage> {
        let at = self.stages.iter().position(|s| s.name == name)?;
        at.checked_sub(1).map(|i| &self.stages[i])
    }

    /// Why `image` may not be the golden AMI of `parameter`, if it may not: an AMI the hub does
    /// not own (a copy of someone else's, a public one), or one of another family or of none
    /// (by its `amiflow:family` tag or its name prefix). share and param refuse it for good.
    pub fn refuse_image(&self, image: &crate::aws::Image, parameter: &str) -> Option<String> {
        if image.owner != self.hub_account {
            return Some(format!(
                "AMI {} is owned by account {}, not by the hub {}: only the hub's own AMIs become golden; refused",
                image.id, image.owner, self.hub_account
            ));
        }
        if image.public {
            return Some(format!(
                "AMI {} is public (anyone may launch it): a golden AMI is shared with the stage accounts only; make it private (ec2 modify-image-attribute --launch-permission \"Remove=[{{Group=all}}]\"), then replay; refused",
                image.id
            ));
        }
        match self.family_of(&image.name, image.family_tag.as_deref()) {
            Some(f) if f.parameter_name == parameter => None,
            Some(f) => Some(format!(
                "AMI {} ({}) is of the family of {}, not of {parameter}; refused",
                image.id, image.name, f.parameter_name
            )),
            None => Some(format!(
                "AMI {} ({}) is of no golden family of the policy (no name prefix matches and it has no amiflow:family tag), so it cannot become the golden AMI of {parameter}; refused",
                image.id, image.name
            )),
        }
    }

    /// The family an AMI belongs to, by its `amiflow:family` tag or its name prefix.
    pub fn family_of(&self, image_name: &str, family_tag: Option<&str>) -> Option<&Family> {
        if let Some(tag) = family_tag
            && let Some(f) = self.families.iter().find(|f| f.parameter_name == tag)
        {
            return Some(f);
        }
        self.families
            .iter()
            .find(|f| image_name.starts_with(&f.name_prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = include_str!("../../../local/amiflow.toml");

    fn window(cron: &str) -> Window {
        Window {
            cron: cron.into(),
            duration_hours: 4,
        }
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    /// EventBridge Scheduler's cron as AWS reads it: `SAT#1` the first Saturday, days of the week
    /// numbered from Sunday = 1, `L` the last day, years; open for `duration_hours` from each start.
    #[test]
    fn a_window_opens_when_eventbridge_scheduler_would_open_it() {
        // 2026-12-05 is the first Saturday of December.
        let first_saturday = window("cron(0 2 ? * SAT#1 *)");
        let before = at(2026, 12, 1, 0, 0);
        assert_eq!(
            first_saturday.next_opening(before),
            Some(at(2026, 12, 5, 2, 0))
        );
        assert_eq!(first_saturday.open_since(before), None);
        assert_eq!(
            first_saturday.open_since(at(2026, 12, 5, 5, 59)),
            Some(at(2026, 12, 5, 2, 0))
        );
        assert_eq!(first_saturday.open_since(at(2026, 12, 5, 6, 0)), None);
        assert_eq!(
            first_saturday.next_opening(at(2026, 12, 5, 2, 0)),
            Some(at(2027, 1, 2, 2, 0))
        );
        // AWS numbers Sunday 1: 7 is Saturday, 1 Sunday.
        assert_eq!(
            window("cron(30 1 ? * 7 *)").next_opening(before),
            Some(at(2026, 12, 5, 1, 30))
        );
        assert_eq!(
            window("cron(30 1 ? * 1 *)").next_opening(before),
            Some(at(2026, 12, 6, 1, 30))
        );
        assert_eq!(
            window("cron(0 22 L * ? *)").next_opening(before),
            Some(at(2026, 12, 31, 22, 0))
        );
        assert_eq!(
            window("cron(0 2 ? * MON 2025)").next_opening(before),
            None,
            "its year is past"
        );
    }

    #[test]
    fn a_cron_eventbridge_scheduler_would_refuse_is_refused_with_the_reason() {
        for (cron, why) in [
            (
                "cron(0 2 * * SAT *)",
                "exactly one of day-of-month and day-of-week must be `?`",
            ),
            (
                "cron(0 2 ? * ? *)",
                "exactly one of day-of-month and day-of-week must be `?`",
            ),
            ("cron(0 2 ? * SAT)", "it has 5 fields, not 6"),
            ("0 2 ? * SAT *", "it is not of the form cron(...)"),
            ("cron(0 25 ? * SAT *)", ""),
        ] {
            let policy = LOCAL.replace("cron(0 2 ? * SAT#3 *)", cron);
            let err = Policy::parse(&policy).unwrap_err().to_string();
            assert!(
                err.contains(&format!("stage \"prod\": window.cron {cron:?} is not an EventBridge Scheduler cron: {why}")),
                "{cron}: {err}"
            );
        }
    }

    #[test]
    fn the_local_world_policy_is_valid() {
        let p = Policy::parse(LOCAL).unwrap();
        assert_eq!(p.stages.len(), 3);
        assert_eq!(p.stage_for_account("222222222222").unwrap().name, "uat");
        assert_eq!(
            p.family_of("golden-al2023-2026-11", None)
                .unwrap()
                .parameter_name,
            "/golden/al2023/ami-id"
        );
        assert_eq!(
            p.family_of("anything", Some("/golden/win2022/ami-id"))
                .unwrap()
                .name_prefix,
            "golden-win2022-"
        );
        assert!(p.family_of("ubuntu-22.04", None).is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let bad_account = LOCAL.replace("account = \"333333333333\"", "account = \"3333\"");
        assert!(
            Policy::parse(&bad_account)
                .unwrap_err()
                .to_string()
                .contains("stage \"prod\": account \"3333\"")
        );
        let bad_cron = LOCAL.replace("cron(0 2 ? * SAT#3 *)", "every saturday");
        assert!(
            Policy::parse(&bad_cron)
                .unwrap_err()
                .to_string()
                .contains("window.cron")
        );
        let unknown = format!("{LOCAL}\nsurprise = 1\n");
        assert!(
            Policy::parse(&unknown)
                .unwrap_err()
                .to_string()
                .contains("surprise")
        );
        let dup = LOCAL.replace("account = \"333333333333\"", "account = \"222222222222\"");
        assert!(
            Policy::parse(&dup)
                .unwrap_err()
                .to_string()
                .contains("already used")
        );
    }

    #[test]
    fn gate_limits_default_to_todays_behaviour_and_absurd_ones_say_how_to_fix_them() {
        let p = Policy::parse(LOCAL).unwrap();
        for s in &p.stages {
            // uat tolerates the local world's one group that rolls back by design.
            let tolerated = if s.name == "uat" { 1 } else { 0 };
            assert_eq!(s.max_failed_groups, FailureTolerance::Groups(tolerated));
            assert_eq!(s.bake_hours, 0.0);
            assert!(!s.requires_approval);
        }
        let with = |extra: &str| {
            Policy::parse(&LOCAL.replacen(
                "cloudformation = \"update-stack\"",
                &format!("cloudformation = \"update-stack\"\n{extra}"),
                1,
            ))
        };
        let err = with("requires_approval = true").unwrap_err().to_string();
        assert!(
            err.contains("stage \"qa\": requires_approval: the first stage"),
            "{err}"
        );
        let p = with("max_failed_groups = \"25%\"\nbake_hours = 0.5").unwrap();
        assert_eq!(
            p.stages[0].max_failed_groups,
            FailureTolerance::Percent(25.0)
        );
        assert_eq!(p.stages[0].max_failed_groups.allowed(7), 1);
        assert_eq!(p.stages[0].bake_hours, 0.5);
        assert_eq!(
            with("max_failed_groups = 2").unwrap().stages[0]
                .max_failed_groups
                .allowed(7),
            2
        );
        for (bad, says) in [
            (
                "max_failed_groups = -1",
                "max_failed_groups must be a count of groups",
            ),
            ("max_failed_groups = \"150%\"", "not \"150%\""),
            ("max_failed_groups = \"some\"", "(e.g. \"10%\")"),
            (
                "bake_hours = -2.0",
                "stage \"qa\": bake_hours = -2 must be from 0 to 720",
            ),
            (
                "bake_hours = 9000.0",
                "bake_hours = 9000 must be from 0 to 720",
            ),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!(p.stage_before("uat").unwrap().name, "qa");
        assert!(p.stage_before("qa").is_none());
    }

    #[test]
    fn hand_made_changes_are_respected_unless_the_stage_says_override() {
        let policy = Policy::parse(include_str!("../../../local/amiflow.toml")).unwrap();
        assert!(
            policy
                .stages
                .iter()
                .all(|s| s.hand_made_changes == HandMadeChanges::Respect)
        );
        let text = include_str!("../../../local/amiflow.toml").replacen(
            "cloudformation = \"update-stack\"",
            "cloudformation = \"update-stack\"\nhand_made_changes = \"override\"",
            1,
        );
        let policy = Policy::parse(&text).unwrap();
        assert_eq!(
            policy.stages[0].hand_made_changes,
            HandMadeChanges::Override
        );
        let text = include_str!("../../../local/amiflow.toml").replacen(
            "cloudformation = \"update-stack\"",
            "cloudformation = \"update-stack\"\nhand_made_changes = \"ignore\"",
            1,
        );
        let err = Policy::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("hand_made_changes") || err.contains("`respect`, `override`"),
            "{err}"
        );
        assert!(err.contains("respect") && err.contains("override"), "{err}");
    }

    #[test]
    fn refresh_preferences_default_to_what_aws_does_without_them() {
        let policy = Policy::parse(LOCAL).unwrap();
        assert!(
            policy
                .stages
                .iter()
                .all(|s| s.max_healthy_percentage.is_none() && s.bake_time_seconds.is_none())
        );
        let text = LOCAL.replacen(
            "min_healthy_percentage = 90",
            "min_healthy_percentage = 100\nmax_healthy_percentage = 200\nbake_time_seconds = 600",
            1,
        );
        let prod = Policy::parse(&text)
            .unwrap()
            .stage_named("prod")
            .unwrap()
            .clone();
        assert_eq!(
            (prod.max_healthy_percentage, prod.bake_time_seconds),
            (Some(200), Some(600))
        );
    }

    #[test]
    fn refresh_preferences_aws_would_refuse_are_refused_at_start_with_the_fix() {
        // prod has min_healthy_percentage = 90.
        let with = |extra: &str| {
            Policy::parse(&LOCAL.replacen(
                "min_healthy_percentage = 90",
                &format!("min_healthy_percentage = 90\n{extra}"),
                1,
            ))
            .map(|_| ())
            .map_err(|e| {
                let e = e.to_string();
                e.split_once("stage \"prod\": ")
                    .map_or(e.clone(), |(_, why)| why.to_owned())
            })
        };
        assert_eq!(
            with("max_healthy_percentage = 250"),
            Err("max_healthy_percentage = 250 is outside 100 to 200: use 100 to replace instances one batch at a time, up to 200 to launch every replacement before terminating".into())
        );
        assert_eq!(
            with("max_healthy_percentage = 195"),
            Err("max_healthy_percentage = 195 is more than 100 above min_healthy_percentage = 90, which AWS refuses: lower it to 190 or raise min_healthy_percentage to 95".into())
        );
        assert_eq!(with("max_healthy_percentage = 190"), Ok(()));
        assert_eq!(
            with("bake_time_seconds = -1"),
            Err("bake_time_seconds = -1 is outside 0 to 172800 (two days), what AWS accepts as a refresh's BakeTime".into())
        );
        assert_eq!(
            with("bake_time_seconds = 172801").unwrap_err(),
            "bake_time_seconds = 172801 is outside 0 to 172800 (two days), what AWS accepts as a refresh's BakeTime"
        );
        assert_eq!(with("bake_time_seconds = 172800"), Ok(()));
    }

    #[test]
    fn trusted_builds_and_approval_tags_are_checked_at_start() {
        let with = |extra: &str| {
            LOCAL.replacen(
                "name_prefix = \"golden-al2023-\"",
                &format!("name_prefix = \"golden-al2023-\"\n{extra}"),
                1,
            )
        };
        let p = Policy::parse(&with(
            "trusted_builds = [\"arn:aws:imagebuilder:us-east-1:111111111111:image/golden-al2023/\"]\napproval_tag = \"amiflow:approved\"",
        ))
        .unwrap();
        assert_eq!(
            p.families[0].approval_tag.as_deref(),
            Some("amiflow:approved")
        );
        assert_eq!(p.families[1].trusted_builds, Vec::<String>::new());
        let err = Policy::parse(&with("trusted_builds = [\"golden-al2023\"]")).unwrap_err();
        assert!(
            err.to_string().contains(
                "trusted_builds entry \"golden-al2023\" is not an Image Builder image ARN prefix"
            ),
            "{err}"
        );
        let err = Policy::parse(&with("approval_tag = \"aws:approved\"")).unwrap_err();
        assert!(
            err.to_string()
                .contains("approval_tag \"aws:approved\" must be a tag key"),
            "{err}"
        );
    }
}
