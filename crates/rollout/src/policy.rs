//! The rollout policy: one TOML file (`AMIFLOW_CONFIG`) describing the hub, the golden AMI
//! families and, per stage, its account, maintenance window and safety limits. Validated at start;
//! every error names the field and what would be accepted.

use std::path::Path;

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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// EventBridge Scheduler expression, e.g. `cron(0 2 ? * SAT#1 *)` (1st Saturday, 02:00).
    pub cron: String,
    /// How long the window stays open; refreshes not started by then are skipped.
    pub duration_hours: u32,
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub parameter_name: String,
    pub name_prefix: String,
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
            if !(s.window.cron.starts_with("cron(") && s.window.cron.ends_with(')'))
                || s.window
                    .cron
                    .trim_start_matches("cron(")
                    .trim_end_matches(')')
                    .split_whitespace()
                    .count()
                    != 6
            {
                return Err(format!(
                    "{at}: window.cron {:?} must be an EventBridge Scheduler cron with 6 fields, e.g. \"cron(0 2 ? * SAT#1 *)\"",
                    s.window.cron
                ));
            }
            if s.window.duration_hours == 0 || s.window.duration_hours > 24 {
                return Err(format!("{at}: window.duration_hours must be 1 to 24"));
            }
            if s.max_concurrent_refreshes == 0 {
                return Err(format!("{at}: max_concurrent_refreshes must be at least 1"));
            }
            if !(0..=100).contains(&s.min_healthy_percentage) {
                return Err(format!("{at}: min_healthy_percentage must be 0 to 100"));
            }
            if s.checkpoints.iter().any(|c| !(1..=100).contains(c)) || !s.checkpoints.is_sorted() {
                return Err(format!(
                    "{at}: checkpoints must be ascending percentages from 1 to 100"
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
}
