//! Where the refresh-worker keeps its [mark](crate::mark) on a group, so that it is in AWS (read
//! the same by every process, a restarted worker and `amictl status`) and fights no owner.
//!
//! A group's own tags are the cheap place: they come with every group read, and a server-side
//! tag filter finds the refreshes in flight. A group a CloudFormation stack owns is different:
//! its tags are what its template declares, and CloudFormation's drift detection reports a tag
//! added outside the stack as a change to the stack's resource. Such a group's mark is kept in an
//! SSM parameter of its account instead, `/amiflow/marks/<group>` ([`parameter_name`]), and those
//! in flight are found by listing that path.
//!
//! [`MarkStore`] is one place (the tags: [`TagMarks`]; the parameters: [`ParameterMarks`]);
//! [`Marks`] picks the place by the group ([`MarkPlace::of`]) and answers for both.

use std::collections::{BTreeSet, HashMap};

use runtime::StepError;

use super::groups::{Group, Groups};
use super::parameters::SsmParameters;
use super::records::{Records, SsmRecords};
use super::stacks::STACK_TAG;
use crate::mark::{Mark, MarkState, Record, STATE_TAG, mark_of};

/// The SSM path under which the marks of stack-owned groups are kept, one parameter per group.
pub const MARKS_PATH: &str = "/amiflow/marks";

/// SSM parameter names are at most 1,011 characters counting the parameter's ARN
/// (`arn:aws:ssm:<region>:<account>:parameter`, up to about 70 of them): room is left for it.
const NAME_MAX: usize = 900;

/// The parameter that keeps `group`'s mark. Parameter names hold only `a-zA-Z0-9_.-` (and `/`
/// between levels); an Auto Scaling group's name may hold almost any character (spaces, `/`,
/// `:`, Unicode). Every byte outside `a-zA-Z0-9.-` becomes `_` and two hex digits, so two groups
/// never share a parameter; a name too long for SSM that way is cut and ends with `__` and a
/// hash of the whole name (`__` never occurs otherwise, since every `_` starts an escape). The
/// parameter's value names its group, so a reader checks it and never needs to decode a name.
pub fn parameter_name(group: &str) -> String {
    let mut name = format!("{MARKS_PATH}/");
    let prefix = name.len();
    for b in group.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02X}"));
        }
    }
    if name.len() <= NAME_MAX {
        return name;
    }
    let suffix = format!("__{:016x}", fnv1a(group.as_bytes()));
    let mut cut = NAME_MAX - suffix.len();
    // Not inside an escape.
    while cut > prefix && name[..cut].rfind('_').is_some_and(|i| cut - i < 3) {
        cut -= 1;
    }
    name.truncate(cut);
    name.push_str(&suffix);
    name
}

/// FNV-1a, 64 bits: a hash that stays the same across builds (the standard library's does not
/// promise to), so every version of amiflow finds the same parameter.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The SSM side of [`ParameterMarks`]: mark parameters' raw values, by group.
pub trait MarkParameters: Send + Sync {
    /// The value of the group's mark parameter, if it has one.
    fn mark_value(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Option<String>, StepError>> + Send;
    /// Create or overwrite the group's mark parameter (a `String` parameter).
    fn put_mark_value(
        &self,
        group: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    /// Every mark parameter's value under [`MARKS_PATH`].
    fn mark_values(&self) -> impl Future<Output = Result<Vec<String>, StepError>> + Send;
}

/// The mark parameters are records like amiflow's others (`aws::records`), one per group.
impl MarkParameters for SsmParameters {
    async fn mark_value(&self, group: &str) -> Result<Option<String>, StepError> {
        SsmRecords(self.0.clone())
            .read_record(&parameter_name(group))
            .await
    }

    async fn put_mark_value(&self, group: &str, value: &str) -> Result<(), StepError> {
        SsmRecords(self.0.clone())
            .write_record(&parameter_name(group), value)
            .await
    }

    async fn mark_values(&self) -> Result<Vec<String>, StepError> {
        // Every name under the path is one level deep: `parameter_name` escapes each `/`.
        let records = SsmRecords(self.0.clone()).list_records(MARKS_PATH).await?;
        Ok(records.into_iter().map(|r| r.value).collect())
    }
}

/// Where a group's mark is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkPlace {
    /// The group's own tags.
    Tags,
    /// An SSM parameter: the group is a CloudFormation stack's, and its tags are the template's.
    Parameter,
}

impl MarkPlace {
    pub fn of(group: &Group) -> Self {
        if group.tags.contains_key(STACK_TAG) {
            MarkPlace::Parameter
        } else {
            MarkPlace::Tags
        }
    }
}

/// One place marks are kept in.
pub trait MarkStore: Send + Sync {
    /// The group's record, if this place holds one.
    fn read(&self, group: &Group)
    -> impl Future<Output = Result<Option<Record>, StepError>> + Send;
    /// Write the group's record here, in one call.
    fn write(
        &self,
        group: &str,
        record: &Record,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

/// Marks in the groups' own tags (batched with other tag writes if the groups batch them).
pub struct TagMarks<'a, G>(pub &'a G);

impl<G: Groups> MarkStore for TagMarks<'_, G> {
    async fn read(&self, group: &Group) -> Result<Option<Record>, StepError> {
        Ok(Record::of_tags(group))
    }

    async fn write(&self, group: &str, record: &Record) -> Result<(), StepError> {
        let tags = record.mark.tags(record.reason.as_deref());
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // A start's mark counts a slot taken; a close's slot was freed before its write.
        if record.mark.state == MarkState::InProgress {
            self.0.set_tags(group, &tags).await
        } else {
            self.0.set_tags_unhurried(group, &tags).await
        }
    }
}

/// Marks in SSM parameters under [`MARKS_PATH`].
pub struct ParameterMarks<'a, P>(pub &'a P);

impl<P: MarkParameters> ParameterMarks<'_, P> {
    /// Every record kept here, by group.
    async fn all(&self) -> Result<HashMap<String, Record>, StepError> {
        Ok(self
            .0
            .mark_values()
            .await?
            .iter()
            .filter_map(|v| Record::of_parameter_value(v))
            .collect())
    }
}

impl<P: MarkParameters> MarkStore for ParameterMarks<'_, P> {
    async fn read(&self, group: &Group) -> Result<Option<Record>, StepError> {
        Ok(self
            .0
            .mark_value(&group.name)
            .await?
            .and_then(|v| Record::of_parameter_value(&v))
            // A cut name's hash names another group only by a collision: not this one's.
            .filter(|(name, _)| *name == group.name)
            .map(|(_, record)| record))
    }

    async fn write(&self, group: &str, record: &Record) -> Result<(), StepError> {
        self.0
            .put_mark_value(group, &record.parameter_value(group))
            .await
    }
}

/// What [`Marks::states`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MarkStates {
    /// Groups with a refresh in flight.
    pub running: BTreeSet<String>,
    /// Groups whose last refresh failed or rolled back, with the AMI it was to.
    pub failed: std::collections::BTreeMap<String, String>,
}

/// The account's marks, each kept where its group's owner does not mind ([`MarkPlace::of`]).
pub struct Marks<'a, G, P> {
    groups: &'a G,
    tags: TagMarks<'a, G>,
    parameters: ParameterMarks<'a, P>,
}

impl<'a, G: Groups, P: MarkParameters> Marks<'a, G, P> {
    pub fn new(groups: &'a G, params: &'a P) -> Self {
        Marks {
            groups,
            tags: TagMarks(groups),
            parameters: ParameterMarks(params),
        }
    }

    /// The groups the tags are on.
    pub fn groups(&self) -> &'a G {
        self.groups
    }

    /// The group's record, from where it is kept. A stack-owned group with no parameter yet is
    /// read from its tags: amiflow marked such groups there before, and the record stays valid.
    pub async fn read(&self, group: &Group) -> Result<Option<Record>, StepError> {
        match MarkPlace::of(group) {
            MarkPlace::Tags => self.tags.read(group).await,
            MarkPlace::Parameter => match self.parameters.read(group).await? {
                Some(record) => Ok(Some(record)),
                None => self.tags.read(group).await,
            },
        }
    }

    /// Write the group's record to `place` (the group's [`MarkPlace::of`]).
    pub async fn write(
        &self,
        place: MarkPlace,
        group: &str,
        record: &Record,
    ) -> Result<(), StepError> {
        match place {
            MarkPlace::Tags => self.tags.write(group, record).await,
            MarkPlace::Parameter => self.parameters.write(group, record).await,
        }
    }

    /// The groups whose mark says a refresh of ours runs: those tagged so (a server-side filter)
    /// and those whose parameter says so (one listing of [`MARKS_PATH`]). A stack-owned group's
    /// tags count only while it has no parameter (as [`Marks::read`] reads it).
    pub async fn running(&self) -> Result<BTreeSet<String>, StepError> {
        Ok(self.states().await?.running)
    }

    /// The groups with a refresh in flight, and those whose last refresh failed or rolled back
    /// (with the AMI it was to), wherever their marks are kept: one tag-filtered read per state
    /// and one listing of the marks in SSM.
    pub async fn states(&self) -> Result<MarkStates, StepError> {
        let (running, failed, rolled_back, kept) = tokio::join!(
            self.groups
                .with_tag_value(STATE_TAG, MarkState::InProgress.as_str()),
            self.groups
                .with_tag_value(STATE_TAG, MarkState::Failed.as_str()),
            self.groups
                .with_tag_value(STATE_TAG, MarkState::RolledBack.as_str()),
            self.parameters.all()
        );
        let kept = kept?;
        let failing = |m: &Mark| matches!(m.state, MarkState::Failed | MarkState::RolledBack);
        let mut states = MarkStates::default();
        for (name, r) in &kept {
            if r.mark.is_running() {
                states.running.insert(name.clone());
            } else if failing(&r.mark) {
                states.failed.insert(name.clone(), r.mark.ami.clone());
            }
        }
        // A stack-owned group's tags count only until it has a mark in SSM (legacy marks).
        let tagged = running?
            .into_iter()
            .chain(failed?)
            .chain(rolled_back?)
            .filter(|g| MarkPlace::of(g) == MarkPlace::Tags || !kept.contains_key(&g.name));
        for g in tagged {
            match mark_of(&g) {
                Some(m) if m.is_running() => {
                    states.running.insert(g.name);
                }
                Some(m) if failing(&m) => {
                    states.failed.insert(g.name, m.ami);
                }
                _ => {}
            }
        }
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;
    use crate::mark::REFRESH_TAG;

    fn record(state: MarkState, reason: Option<&str>) -> Record {
        Record {
            mark: Mark {
                ami: "ami-0000000000000000b".into(),
                state,
                refresh_id: "ir-1".into(),
                deadline: "-".into(),
                parameter: "/golden/al2023/ami-id".into(),
            },
            reason: reason.map(str::to_owned),
        }
    }

    fn stack_owned(aws: &FakeAws, name: &str) {
        aws.group(name, "lt-1", "1", "ami-0000000000000000a", 1);
        aws.groups
            .lock()
            .unwrap()
            .get_mut(name)
            .unwrap()
            .tags
            .insert(STACK_TAG.into(), "app".into());
    }

    #[test]
    fn every_group_name_has_its_own_valid_parameter() {
        assert_eq!(parameter_name("web-1.a"), "/amiflow/marks/web-1.a");
        assert_eq!(
            parameter_name("my app/web:1_x"),
            "/amiflow/marks/my_20app_2Fweb_3A1_5Fx"
        );
        let valid = |n: &str| {
            n.len() <= NAME_MAX
                && n.strip_prefix("/amiflow/marks/").is_some_and(|rest| {
                    rest.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                })
        };
        // 255 four-byte characters: 3,060 characters escaped, more than SSM allows.
        let long = "𝔘".repeat(255);
        let mut other = "𝔘".repeat(254);
        other.push('x');
        let names = [
            parameter_name("a_b"),
            parameter_name("a b"),
            parameter_name("a_20b"),
            parameter_name(&long),
            parameter_name(&other),
            parameter_name(&"w".repeat(255)),
        ];
        for n in &names {
            assert!(valid(n), "{n}");
        }
        let distinct: BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert!(names[3].contains("__") && !names[0].contains("__"));
    }

    #[tokio::test]
    async fn a_stack_owned_groups_mark_goes_to_its_parameter_and_never_to_its_tags() {
        let aws = FakeAws::default();
        aws.group("plain", "lt-1", "1", "ami-0000000000000000a", 1);
        stack_owned(&aws, "app-web");
        let marks = Marks::new(&aws, &aws);
        let running = record(MarkState::InProgress, None);
        let skipped = record(MarkState::Skipped, Some("owned by stack app"));
        for (name, r) in [("plain", &running), ("app-web", &skipped)] {
            let group = aws.groups.lock().unwrap()[name].clone();
            marks.write(MarkPlace::of(&group), name, r).await.unwrap();
        }
        let (plain, stacked) = {
            let groups = aws.groups.lock().unwrap();
            (groups["plain"].clone(), groups["app-web"].clone())
        };
        assert!(plain.tags.contains_key(REFRESH_TAG));
        assert_eq!(
            stacked.tags.keys().collect::<Vec<_>>(),
            [STACK_TAG],
            "the stack's group keeps exactly its stack's tags"
        );
        assert_eq!(
            aws.params.lock().unwrap()["/amiflow/marks/app-web"].data_type,
            "text"
        );
        assert_eq!(marks.read(&plain).await.unwrap(), Some(running.clone()));
        assert_eq!(marks.read(&stacked).await.unwrap(), Some(skipped));
        assert_eq!(
            marks.running().await.unwrap(),
            BTreeSet::from(["plain".to_owned()])
        );
        // In flight in a parameter: counted too.
        marks
            .write(MarkPlace::Parameter, "app-web", &running)
            .await
            .unwrap();
        assert_eq!(
            marks.running().await.unwrap(),
            BTreeSet::from(["app-web".to_owned(), "plain".to_owned()])
        );
    }

    #[tokio::test]
    async fn a_stack_owned_group_marked_in_tags_before_reads_them_until_it_has_a_parameter() {
        let aws = FakeAws::default();
        stack_owned(&aws, "app-web");
        let running = record(MarkState::InProgress, None);
        TagMarks(&aws).write("app-web", &running).await.unwrap();
        let marks = Marks::new(&aws, &aws);
        let group = || aws.groups.lock().unwrap()["app-web"].clone();
        assert_eq!(marks.read(&group()).await.unwrap(), Some(running.clone()));
        assert_eq!(
            marks.running().await.unwrap(),
            BTreeSet::from(["app-web".to_owned()])
        );
        // Closed into its parameter: the stale tags no longer count.
        let done = record(MarkState::Succeeded, None);
        marks
            .write(MarkPlace::Parameter, "app-web", &done)
            .await
            .unwrap();
        assert_eq!(marks.read(&group()).await.unwrap(), Some(done));
        assert!(marks.running().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_parameter_naming_another_group_is_not_this_groups_mark() {
        let aws = FakeAws::default();
        stack_owned(&aws, "app-web");
        aws.put_mark_value(
            "app-web",
            &record(MarkState::Failed, None).parameter_value("other"),
        )
        .await
        .unwrap();
        let group = aws.groups.lock().unwrap()["app-web"].clone();
        assert_eq!(ParameterMarks(&aws).read(&group).await.unwrap(), None);
    }
}
