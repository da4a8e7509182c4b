use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::keys;

pub(crate) const AMI_ID: &str = r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$";
pub(crate) const ACCOUNT_ID: &str = r"^[0-9]{12}$";
/// An Auto Scaling group name as AWS allows it: no control character but tab, line feed and
/// carriage return (the length, 1 to 255, is checked besides).
pub(crate) const ASG_NAME: &str = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$";
const PARAMETER_NAME: &str = r"^/?[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$";
const REGION: &str = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$";
const STAGE: &str = r"^[a-z][a-z0-9-]{0,31}$";
const ROLLOUT_ID: &str = r"^(/?[A-Za-z0-9_.\-/]+@ami-([0-9a-f]{8}|[0-9a-f]{17}))?$";

/// Identity and provenance carried by every amiflow `detail` (DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Meta {
    /// Contract version; a reader rejects a major version it does not know.
    #[schemars(range(min = 1))]
    pub schema_version: u32,
    /// `<parameter name>@<ami id>`; empty only for a window opening, which belongs to no rollout.
    #[schemars(regex(pattern = ROLLOUT_ID))]
    pub rollout_id: String,
    /// Idempotency key of this step, derived only from business fields.
    #[schemars(length(min = 1, max = 1600))]
    pub key: String,
    /// `key` of the event that led to this one; empty for a root event.
    #[serde(default)]
    #[schemars(length(max = 1600))]
    pub caused_by: String,
    /// When the producer built the event: for ordering and "newer wins", never identity.
    pub emitted_at: DateTime<Utc>,
}

impl Meta {
    pub fn new(rollout_id: String, key: String, caused_by: &str) -> Self {
        Self {
            schema_version: crate::SCHEMA_VERSION,
            rollout_id,
            key,
            caused_by: caused_by.to_owned(),
            emitted_at: Utc::now(),
        }
    }
}

/// A new golden AMI exists in the hub account and should be rolled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AmiBuilt {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    #[schemars(regex(pattern = REGION))]
    pub region: String,
    #[schemars(length(min = 3, max = 128))]
    pub image_name: String,
    pub created_at: DateTime<Utc>,
    #[schemars(regex(pattern = PARAMETER_NAME), length(max = 1011))]
    pub parameter_name: String,
    /// Accounts to share with; absent means every spoke in the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = ACCOUNT_ID)), length(max = 1000))]
    pub targets: Option<Vec<String>>,
    /// Customer managed key of the AMI's snapshots, when they are encrypted with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$"))]
    pub kms_key_arn: Option<String>,
}

impl AmiBuilt {
    pub fn new(
        ami_id: &str,
        region: &str,
        image_name: &str,
        created_at: DateTime<Utc>,
        parameter_name: &str,
    ) -> Self {
        Self {
            meta: Meta::new(
                keys::rollout_id(parameter_name, ami_id),
                keys::built(ami_id),
                "",
            ),
            ami_id: ami_id.to_owned(),
            region: region.to_owned(),
            image_name: image_name.to_owned(),
            created_at,
            parameter_name: parameter_name.to_owned(),
            targets: None,
            kms_key_arn: None,
        }
    }
}

/// The AMI is usable from `target_account` (launch and snapshot permissions, KMS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AmiShared {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    #[schemars(regex(pattern = REGION))]
    pub region: String,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    pub source_account: String,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    pub target_account: String,
    #[schemars(regex(pattern = STAGE))]
    pub stage: String,
    #[schemars(regex(pattern = PARAMETER_NAME), length(max = 1011))]
    pub parameter_name: String,
    pub created_at: DateTime<Utc>,
    /// The stage was promoted at its window opening: when that window closes, so the refreshes
    /// it plans still run in it. Absent for the first stage (promoted when the AMI is built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<DateTime<Utc>>,
}

impl AmiShared {
    pub fn new(built: &AmiBuilt, source_account: &str, target_account: &str, stage: &str) -> Self {
        Self {
            meta: Meta::new(
                built.meta.rollout_id.clone(),
                keys::shared(&built.ami_id, target_account),
                &built.meta.key,
            ),
            ami_id: built.ami_id.clone(),
            region: built.region.clone(),
            source_account: source_account.to_owned(),
            target_account: target_account.to_owned(),
            stage: stage.to_owned(),
            parameter_name: built.parameter_name.clone(),
            created_at: built.created_at,
            closes_at: None,
        }
    }
}

/// The account's golden parameter holds `ami_id` (written now, or already).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ParamUpdated {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    pub account: String,
    #[schemars(regex(pattern = PARAMETER_NAME), length(max = 1011))]
    pub parameter_name: String,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    /// The value before this rollout wrote it; absent for a new parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = AMI_ID))]
    pub previous_ami_id: Option<String>,
    #[schemars(range(min = 1))]
    pub parameter_version: i64,
    /// The window the stage was promoted in closes then ([`AmiShared::closes_at`]): the plan-worker
    /// plans at once while it is open, even where refreshes wait for a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<DateTime<Utc>>,
}

impl ParamUpdated {
    pub fn new(
        caused_by: &str,
        account: &str,
        parameter_name: &str,
        ami_id: &str,
        previous_ami_id: Option<String>,
        parameter_version: i64,
    ) -> Self {
        Self {
            meta: Meta::new(
                keys::rollout_id(parameter_name, ami_id),
                keys::param(account, parameter_name, ami_id),
                caused_by,
            ),
            account: account.to_owned(),
            parameter_name: parameter_name.to_owned(),
            ami_id: ami_id.to_owned(),
            previous_ami_id,
            parameter_version,
            closes_at: None,
        }
    }
}

/// A stage's maintenance window opened: reconcile every stale group of the account.
///
/// Two producers, two shapes on the wire, one value after parsing. `amictl rerun` (and
/// [`RolloutWindowOpened::new`]) sends `closes_at`. EventBridge Scheduler cannot compute: its
/// target input can only insert the `<aws.scheduler.scheduled-time>` context attribute (an
/// RFC 3339 UTC timestamp such as `2026-11-14T02:00:00Z`), so the spoke template's schedule sends
/// `opens_at` = that time and `window_hours`, with the key `window:<account>:<stage>:<that time>`.
/// Parsing derives `closes_at = opens_at + window_hours` and shortens such a key to its UTC date,
/// so every consumer sees `closes_at` and the key `window:<account>:<stage>:<YYYY-MM-DD>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WindowWire")]
pub struct RolloutWindowOpened {
    #[serde(flatten)]
    pub meta: Meta,
    pub account: String,
    pub stage: String,
    /// When the window opened, if the producer said so (the Scheduler always does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: DateTime<Utc>,
}

/// Longest window a producer may declare: the policy's and the spoke template's limit.
pub const MAX_WINDOW_HOURS: i64 = 24;

/// A stage's maintenance window opened: reconcile every stale group of the account. Carries
/// `closes_at`, or `opens_at` and `window_hours` (what EventBridge Scheduler can send).
//
// `RolloutWindowOpened` as either producer writes it; its schema is the contract's.
#[derive(Deserialize, JsonSchema)]
#[schemars(
    rename = "RolloutWindowOpened",
    extend("anyOf" = [{"required": ["closes_at"]}, {"required": ["opens_at", "window_hours"]}]),
    transform = absent_is_not_null
)]
struct WindowWire {
    #[serde(flatten)]
    meta: Meta,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    account: String,
    #[schemars(regex(pattern = STAGE))]
    stage: String,
    /// When the window opened (the Scheduler's `<aws.scheduler.scheduled-time>`).
    #[serde(default)]
    #[schemars(with = "DateTime<Utc>")]
    opens_at: Option<DateTime<Utc>>,
    /// When the window closes; refreshes not started by then are skipped.
    #[serde(default)]
    #[schemars(with = "DateTime<Utc>")]
    closes_at: Option<DateTime<Utc>>,
    /// How long the window stays open, counted from `opens_at`.
    #[serde(default)]
    #[schemars(with = "i64", range(min = 1, max = 24))]
    window_hours: Option<i64>,
}

/// The optional times and hours may be left out, never sent as `null`: drop the `null` defaults
/// that `serde(default)` puts in the schema.
fn absent_is_not_null(schema: &mut schemars::Schema) {
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for name in ["opens_at", "closes_at", "window_hours"] {
            if let Some(property) = properties.get_mut(name).and_then(|p| p.as_object_mut()) {
                property.remove("default");
            }
        }
    }
}

impl TryFrom<WindowWire> for RolloutWindowOpened {
    type Error = String;

    fn try_from(w: WindowWire) -> Result<Self, String> {
        let derived = match (w.opens_at, w.window_hours) {
            (Some(opens), Some(hours)) => {
                if !(1..=MAX_WINDOW_HOURS).contains(&hours) {
                    return Err(format!(
                        "window_hours {hours} is out of range: a window lasts 1 to {MAX_WINDOW_HOURS} hours"
                    ));
                }
                Some(opens + chrono::Duration::hours(hours))
            }
            (None, Some(_)) => {
                return Err("window_hours needs opens_at, the time the window opened".into());
            }
            _ => None,
        };
        let closes_at = match (w.closes_at, derived) {
            (Some(given), Some(computed)) if given != computed => {
                return Err(format!(
                    "closes_at {} disagrees with opens_at + window_hours ({})",
                    given.to_rfc3339(),
                    computed.to_rfc3339()
                ));
            }
            (Some(given), _) => given,
            (None, Some(computed)) => computed,
            (None, None) => {
                return Err(
                    "a window needs closes_at, or opens_at and window_hours (what EventBridge Scheduler sends)"
                        .into(),
                );
            }
        };
        if let Some(opens) = w.opens_at
            && closes_at <= opens
        {
            return Err(format!(
                "closes_at {} is not after opens_at {}",
                closes_at.to_rfc3339(),
                opens.to_rfc3339()
            ));
        }
        let mut meta = w.meta;
        // The Scheduler's key ends in the full scheduled time: keep only its UTC date, the
        // window's identity (one window per stage and day).
        let prefix = format!("window:{}:{}:", w.account, w.stage);
        if let Some(stamp) = meta.key.strip_prefix(&prefix)
            && let Ok(at) = DateTime::parse_from_rfc3339(stamp)
        {
            meta.key = keys::window(&w.account, &w.stage, &window_date(at.with_timezone(&Utc)));
        }
        Ok(Self {
            meta,
            account: w.account,
            stage: w.stage,
            opens_at: w.opens_at,
            closes_at,
        })
    }
}

impl JsonSchema for RolloutWindowOpened {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RolloutWindowOpened".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        WindowWire::json_schema(generator)
    }
}

/// The date in a window key: the UTC date the window opened.
fn window_date(opens_at: DateTime<Utc>) -> String {
    opens_at.format("%Y-%m-%d").to_string()
}

impl RolloutWindowOpened {
    pub fn new(
        account: &str,
        stage: &str,
        opens_at: DateTime<Utc>,
        closes_at: DateTime<Utc>,
    ) -> Self {
        Self {
            meta: Meta::new(
                String::new(),
                keys::window(account, stage, &window_date(opens_at)),
                "",
            ),
            account: account.to_owned(),
            stage: stage.to_owned(),
            opens_at: Some(opens_at),
            closes_at,
        }
    }
}

/// How a stale group is moved to the new AMI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// New launch template version with only `ImageId` changed, then an instance refresh.
    LaunchTemplate,
    /// The group belongs to a CloudFormation stack: update the stack, never the group behind it.
    Cloudformation,
}

/// Move one group to `ami_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AsgRefreshRequested {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    pub account: String,
    #[schemars(length(min = 1, max = 255), regex(pattern = ASG_NAME))]
    pub asg_name: String,
    #[schemars(regex(pattern = PARAMETER_NAME), length(max = 1011))]
    pub parameter_name: String,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    pub strategy: Strategy,
    /// When the window closes; after it the refresh is skipped, not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// How many of the stage's groups the plan-worker judged against `parameter_name` (the
    /// family's groups): a percentage `max_failed_groups` is taken of these. Absent in requests
    /// made by hand; the refresh-worker then counts the account's groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub family_groups: Option<u32>,
}

impl AsgRefreshRequested {
    pub fn new(
        caused_by: &str,
        account: &str,
        asg_name: &str,
        parameter_name: &str,
        ami_id: &str,
        strategy: Strategy,
        deadline: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            meta: Meta::new(
                keys::rollout_id(parameter_name, ami_id),
                keys::refresh(account, asg_name, ami_id),
                caused_by,
            ),
            account: account.to_owned(),
            asg_name: asg_name.to_owned(),
            parameter_name: parameter_name.to_owned(),
            ami_id: ami_id.to_owned(),
            strategy,
            deadline,
            family_groups: None,
        }
    }

    /// The request, saying how many groups the family has in the stage.
    pub fn with_family_groups(mut self, groups: u32) -> Self {
        self.family_groups = Some(groups);
        self
    }
}

/// How a group's refresh ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Succeeded,
    Failed,
    RolledBack,
    Cancelled,
    Skipped,
    /// Not started: the stage failed more groups for the AMI than it tolerates
    /// (`max_failed_groups`), so it halted for it until `amictl resume --stage`.
    Halted,
    /// Not started, or cancelled while running: an operator recalled the AMI (`amictl recall`).
    Recalled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled-back",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
            Outcome::Halted => "halted",
            Outcome::Recalled => "recalled",
        }
    }
}

/// A group's move to `ami_id` ended (or was skipped, with the reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AsgRefreshFinished {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = ACCOUNT_ID))]
    pub account: String,
    #[schemars(length(min = 1, max = 255), regex(pattern = ASG_NAME))]
    pub asg_name: String,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    pub outcome: Outcome,
    /// Why, in words a person can act on (empty for a plain success).
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_refresh_id: Option<String>,
}

impl AsgRefreshFinished {
    pub fn new(request: &AsgRefreshRequested, outcome: Outcome, reason: impl Into<String>) -> Self {
        Self {
            meta: Meta::new(
                request.meta.rollout_id.clone(),
                keys::finished(&request.account, &request.asg_name, &request.ami_id),
                &request.meta.key,
            ),
            account: request.account.clone(),
            asg_name: request.asg_name.clone(),
            ami_id: request.ami_id.clone(),
            outcome,
            reason: reason.into(),
            instance_refresh_id: None,
        }
    }
}

/// An operator recalled a golden AMI (`amictl recall`): it is refused everywhere from now on, and
/// every stage whose golden parameter holds it goes back to the family's previous golden AMI.
/// The hub's record `/amiflow/control/recall/<ami>` is the truth; this event only wakes the
/// param-workers, which read that record and never act on the event's word alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AmiRecalled {
    #[serde(flatten)]
    pub meta: Meta,
    #[schemars(regex(pattern = AMI_ID))]
    pub ami_id: String,
    #[schemars(regex(pattern = PARAMETER_NAME), length(max = 1011))]
    pub parameter_name: String,
    /// The AMI an operator named to go back to (`--to`); absent: each stage's previous golden
    /// AMI that is not recalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = AMI_ID))]
    pub to_ami_id: Option<String>,
    /// Why, as the operator said it.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// The caller identity that recalled it (an STS ARN).
    #[schemars(length(min = 1, max = 2048))]
    pub recalled_by: String,
    /// Move the groups back at once (`--now`) instead of in each stage's next window.
    #[serde(default)]
    pub now: bool,
}

impl AmiRecalled {
    pub fn new(ami_id: &str, parameter_name: &str, reason: &str, recalled_by: &str) -> Self {
        Self {
            meta: Meta::new(
                keys::rollout_id(parameter_name, ami_id),
                keys::recalled(ami_id),
                "",
            ),
            ami_id: ami_id.to_owned(),
            parameter_name: parameter_name.to_owned(),
            to_ami_id: None,
            reason: reason.to_owned(),
            recalled_by: recalled_by.to_owned(),
            now: false,
        }
    }
}

/// Any amiflow detail, tagged by its EventBridge `detail-type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    AmiBuilt(AmiBuilt),
    AmiShared(AmiShared),
    ParamUpdated(ParamUpdated),
    RolloutWindowOpened(RolloutWindowOpened),
    AsgRefreshRequested(AsgRefreshRequested),
    AsgRefreshFinished(AsgRefreshFinished),
    AmiRecalled(AmiRecalled),
}

impl Detail {
    /// Every detail-type amiflow defines, in pipeline order.
    pub const TYPES: [&'static str; 7] = [
        "AmiBuilt",
        "AmiShared",
        "ParamUpdated",
        "RolloutWindowOpened",
        "AsgRefreshRequested",
        "AsgRefreshFinished",
        "AmiRecalled",
    ];

    pub fn detail_type(&self) -> &'static str {
        match self {
            Detail::AmiBuilt(_) => "AmiBuilt",
            Detail::AmiShared(_) => "AmiShared",
            Detail::ParamUpdated(_) => "ParamUpdated",
            Detail::RolloutWindowOpened(_) => "RolloutWindowOpened",
            Detail::AsgRefreshRequested(_) => "AsgRefreshRequested",
            Detail::AsgRefreshFinished(_) => "AsgRefreshFinished",
            Detail::AmiRecalled(_) => "AmiRecalled",
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Detail::AmiBuilt(d) => &d.meta,
            Detail::AmiShared(d) => &d.meta,
            Detail::ParamUpdated(d) => &d.meta,
            Detail::RolloutWindowOpened(d) => &d.meta,
            Detail::AsgRefreshRequested(d) => &d.meta,
            Detail::AsgRefreshFinished(d) => &d.meta,
            Detail::AmiRecalled(d) => &d.meta,
        }
    }

    /// The key this detail must carry, recomputed from its business fields (`None` for a window
    /// opening, whose key also holds the opening date that the detail does not repeat). A detail
    /// whose `key` differs was not built by amiflow's rules and is rejected: it would defeat
    /// idempotency.
    pub fn expected_key(&self) -> Option<String> {
        match self {
            Detail::AmiBuilt(d) => Some(keys::built(&d.ami_id)),
            Detail::AmiShared(d) => Some(keys::shared(&d.ami_id, &d.target_account)),
            Detail::ParamUpdated(d) => Some(keys::param(&d.account, &d.parameter_name, &d.ami_id)),
            Detail::RolloutWindowOpened(_) => None,
            Detail::AsgRefreshRequested(d) => {
                Some(keys::refresh(&d.account, &d.asg_name, &d.ami_id))
            }
            Detail::AsgRefreshFinished(d) => {
                Some(keys::finished(&d.account, &d.asg_name, &d.ami_id))
            }
            Detail::AmiRecalled(d) => Some(keys::recalled(&d.ami_id)),
        }
    }

    /// Whether `key` (and `rollout_id`) are the ones amiflow derives for this detail.
    pub fn identity_problem(&self) -> Option<String> {
        let meta = self.meta();
        if let Detail::RolloutWindowOpened(d) = self {
            let prefix = format!("window:{}:{}:", d.account, d.stage);
            let date = meta.key.strip_prefix(&prefix).unwrap_or("");
            if chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_err() {
                return Some(format!("key {:?} is not {prefix}<YYYY-MM-DD>", meta.key));
            }
            if let Some(opens) = d.opens_at
                && date != window_date(opens)
            {
                return Some(format!(
                    "key {:?} names another day than opens_at {}",
                    meta.key,
                    opens.to_rfc3339()
                ));
            }
        }
        if let Some(expected) = self.expected_key()
            && meta.key != expected
        {
            return Some(format!(
                "key {:?} does not match the event's fields (expected {expected:?})",
                meta.key
            ));
        }
        if let Some(expected) = self.expected_rollout_id()
            && meta.rollout_id != expected
        {
            return Some(format!(
                "rollout_id {:?} does not match the event's fields (expected {expected:?})",
                meta.rollout_id
            ));
        }
        None
    }

    /// The rollout id this detail must carry (`None` where any is allowed).
    pub fn expected_rollout_id(&self) -> Option<String> {
        match self {
            Detail::AmiBuilt(d) => Some(keys::rollout_id(&d.parameter_name, &d.ami_id)),
            Detail::AmiShared(d) => Some(keys::rollout_id(&d.parameter_name, &d.ami_id)),
            Detail::ParamUpdated(d) => Some(keys::rollout_id(&d.parameter_name, &d.ami_id)),
            Detail::RolloutWindowOpened(_) | Detail::AsgRefreshFinished(_) => None,
            Detail::AsgRefreshRequested(d) => Some(keys::rollout_id(&d.parameter_name, &d.ami_id)),
            Detail::AmiRecalled(d) => Some(keys::rollout_id(&d.parameter_name, &d.ami_id)),
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        let value = match self {
            Detail::AmiBuilt(d) => serde_json::to_value(d),
            Detail::AmiShared(d) => serde_json::to_value(d),
            Detail::ParamUpdated(d) => serde_json::to_value(d),
            Detail::RolloutWindowOpened(d) => serde_json::to_value(d),
            Detail::AsgRefreshRequested(d) => serde_json::to_value(d),
            Detail::AsgRefreshFinished(d) => serde_json::to_value(d),
            Detail::AmiRecalled(d) => serde_json::to_value(d),
        };
        // Serializing plain structs of strings, numbers and dates cannot fail.
        value.unwrap_or(serde_json::Value::Null)
    }

    /// Deserialize a detail of a known type (no schema check: see [`crate::parse_message`]).
    pub fn from_value(
        detail_type: &str,
        value: serde_json::Value,
    ) -> Result<Option<Detail>, serde_json::Error> {
        Ok(Some(match detail_type {
            "AmiBuilt" => Detail::AmiBuilt(serde_json::from_value(value)?),
            "AmiShared" => Detail::AmiShared(serde_json::from_value(value)?),
            "ParamUpdated" => Detail::ParamUpdated(serde_json::from_value(value)?),
            "RolloutWindowOpened" => Detail::RolloutWindowOpened(serde_json::from_value(value)?),
            "AsgRefreshRequested" => Detail::AsgRefreshRequested(serde_json::from_value(value)?),
            "AsgRefreshFinished" => Detail::AsgRefreshFinished(serde_json::from_value(value)?),
            "AmiRecalled" => Detail::AmiRecalled(serde_json::from_value(value)?),
            _ => return Ok(None),
        }))
    }
}

macro_rules! from_detail {
    ($($t:ident),*) => {$(
        impl From<$t> for Detail {
            fn from(d: $t) -> Self { Detail::$t(d) }
        }
    )*};
}
from_detail!(
    AmiBuilt,
    AmiShared,
    ParamUpdated,
    RolloutWindowOpened,
    AsgRefreshRequested,
    AsgRefreshFinished,
    AmiRecalled
);
