//! A `$Default` group's launch template default version, put back when its refresh does not
//! succeed. Such a group launches whatever version is the default, so the refresh-worker makes
//! the version with the new AMI the default before the refresh (see [`super::start`]); a refresh
//! that fails, rolls back or is cancelled leaves the group's configuration as it was, except for
//! that default, which would make every later launch take the AMI that just failed.
//!
//! What was moved is recorded in AWS before the first default changes, so a worker that
//! restarts (or another process closing the refresh) finds it. Usually the version amiflow makes
//! records it in its own description ([`note`]: `amiflow: <ami> | window <window> | default was
//! <before>`), written by the `CreateLaunchTemplateVersion` that makes it, so moving a default
//! costs no extra write. A version made earlier for the AMI (another window's, or one made for
//! a pinned group) cannot be described again: then the group's [`RESTORE_TAG`] =
//! `<ami>|<window>|<template>:<before>:<set>|...` records it, written just before the move. The
//! AMI and window tie either record to one request, as the mark's do: a refresh of another AMI
//! or window never restores a default it did not move, and a start asked again in the same
//! window (its first attempt failed after moving the default) keeps the record of the first.
//! Restoring is idempotent and never overrides a person: a default that is no longer the one
//! amiflow set (changed by hand meanwhile) is left alone, and the outcome's reason says which it
//! was.

use events::Outcome;
use runtime::StepError;

use super::start::BeforeRefresh;
use crate::aws::{Group, Groups, LaunchSource};
use crate::discovery::override_templates;
use crate::mark::Mark;

/// Tag recording the default versions a refresh's start moved (see the module's description).
pub const RESTORE_TAG: &str = "amiflow:restore-default";
/// Auto Scaling tag values hold at most 256 characters.
const TAG_VALUE_MAX: usize = 256;

/// One template whose default version a start moved.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub template: String,
    /// The default version before the start.
    pub before: i64,
    /// The version the start made the default.
    pub set: i64,
}

/// The default versions one request moved, as [`RESTORE_TAG`] holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub ami: String,
    /// The request's window, as the mark holds it.
    pub window: String,
    pub moved: Vec<Moved>,
}

impl Record {
    /// The tag value; templates that would not fit in one value are left out (and logged):
    /// their default is then not restored. Template ids take 20 characters, so only several long
    /// template names reach the limit.
    fn render(&self) -> String {
        let mut value = format!("{}|{}", self.ami, self.window);
        for m in &self.moved {
            let part = format!("|{}:{}:{}", m.template, m.before, m.set);
            if value.len() + part.len() > TAG_VALUE_MAX {
                tracing::warn!(template = %m.template, before = m.before,
                    "the default versions to restore do not fit in one tag; this one will not be restored");
                continue;
            }
            value.push_str(&part);
        }
        value
    }

    /// A tag value as [`Record::render`] writes it; `None` for anything else (an empty value).
    fn parse(value: &str) -> Option<Record> {
        let mut parts = value.split('|');
        let (ami, window) = (parts.next()?, parts.next()?);
        if ami.is_empty() {
            return None;
        }
        let moved = parts
            .map(|p| {
                // Template names have no ':' (AWS allows letters, digits and `().-/_`).
                let mut fields = p.rsplitn(3, ':');
                let set = fields.next()?.parse().ok()?;
                let before = fields.next()?.parse().ok()?;
                let template = fields.next()?.to_owned();
                Some(Moved {
                    template,
                    before,
                    set,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Record {
            ami: ami.to_owned(),
            window: window.to_owned(),
            moved,
        })
    }
}

/// The description of a version amiflow makes for `ami`; when it is to become its template's
/// default in `window` (`Some`), it records `before`, the default it replaces.
pub(super) fn note(ami: &str, window: Option<&str>, before: i64) -> String {
    match window {
        Some(window) => format!("amiflow: {ami} | window {window} | default was {before}"),
        None => format!("amiflow: {ami}"),
    }
}

/// A [`note`] recording a default move: (AMI, window, the default before).
fn parse_note(description: &str) -> Option<(&str, &str, i64)> {
    let mut parts = description.strip_prefix("amiflow: ")?.split(" | ");
    let ami = parts.next()?;
    let window = parts.next()?.strip_prefix("window ")?;
    let before = parts.next()?.strip_prefix("default was ")?.parse().ok()?;
    Some((ami, window, before))
}

/// Run the start's actions on the group's templates (setting default versions), after recording
/// every default they move that the versions' descriptions do not record already (on the
/// group's [`RESTORE_TAG`]), so that a failed refresh can put them back.
pub(super) async fn move_defaults(
    groups: &impl Groups,
    group: &str,
    ami: &str,
    window: &str,
    actions: &[BeforeRefresh],
) -> Result<(), StepError> {
    let mut moved: Vec<Moved> = Vec::new();
    for action in actions {
        let BeforeRefresh::SetDefault {
            template,
            version,
            before,
            recorded,
        } = action;
        if !recorded && before != version && !moved.iter().any(|m| &m.template == template) {
            moved.push(Moved {
                template: template.clone(),
                before: *before,
                set: *version,
            });
        }
    }
    // Nothing moves (already the default: this request's earlier attempt moved it, and its
    // record stays), or the new versions record it: nothing to write.
    if !moved.is_empty() {
        let record = Record {
            ami: ami.to_owned(),
            window: window.to_owned(),
            moved,
        };
        groups
            .set_tags(group, &[(RESTORE_TAG, record.render().as_str())])
            .await?;
    }
    for action in actions {
        action.run(groups).await?;
    }
    Ok(())
}

/// After a refresh of `group` ended with `outcome` (as Auto Scaling reported it): for a failed,
/// rolled-back or cancelled one, put back each default version its start moved, and say what was
/// done (appended to the outcome's reason); `None` when there is nothing to say.
pub(super) async fn restore(
    groups: &impl Groups,
    group: &str,
    mark: &Mark,
    outcome: Outcome,
) -> Result<Option<String>, StepError> {
    if !matches!(
        outcome,
        Outcome::Failed | Outcome::RolledBack | Outcome::Cancelled
    ) {
        return Ok(None);
    }
    let Some(found) = groups.get(group).await? else {
        return Ok(None);
    };
    let mut moved = found
        .tags
        .get(RESTORE_TAG)
        .and_then(|v| Record::parse(v))
        .filter(|r| r.ami == mark.ami && r.window == mark.deadline)
        .map(|r| r.moved)
        .unwrap_or_default();
    for template in default_templates(&found) {
        if moved.iter().any(|m| m.template == template) {
            continue;
        }
        let Some(made) = groups.version_with_image(&template, &mark.ami).await? else {
            continue;
        };
        if let Some((_, _, before)) =
            parse_note(&made.description).filter(|(ami, window, before)| {
                *ami == mark.ami && *window == mark.deadline && *before != made.number
            })
        {
            moved.push(Moved {
                template,
                before,
                set: made.number,
            });
        }
    }
    let mut said = Vec::new();
    for m in &moved {
        let now = groups
            .template_version(&m.template, "$Default")
            .await?
            .map(|v| v.number);
        said.push(match now {
            Some(n) if n == m.set => {
                groups.set_default_version(&m.template, m.before).await?;
                tracing::info!(%group, template = %m.template, from = m.set, to = m.before,
                    "refresh did not succeed; default version set back");
                format!(
                    "the default version of {} was set back to {} (from {})",
                    m.template, m.before, m.set
                )
            }
            // Restored already (this close is repeated).
            Some(n) if n == m.before => {
                format!("the default version of {} is back at {n}", m.template)
            }
            Some(n) => format!(
                "the default version of {} was left at {n}: changed by hand during the refresh (amiflow had set {}, it was {} before)",
                m.template, m.set, m.before
            ),
            None => format!(
                "the default version of {} could not be set back to {}: the template is gone",
                m.template, m.before
            ),
        });
    }
    Ok((!said.is_empty()).then(|| said.join("; ")))
}

/// The templates `group` launches from by `$Default` (its own and its overrides').
fn default_templates(group: &Group) -> Vec<String> {
    let LaunchSource::Template { id, version, mixed } = &group.source else {
        return Vec::new();
    };
    let mut templates = Vec::new();
    if version == "$Default" {
        templates.push(id.clone());
    }
    for o in mixed.as_deref().map(override_templates).unwrap_or_default() {
        if let Some(t) = o
            .template
            .filter(|t| o.version == "$Default" && !templates.contains(t))
        {
            templates.push(t);
        }
    }
    templates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;
    use crate::mark::MarkState;

    const NEW: &str = "ami-0000000000000000b";

    #[tokio::test]
    async fn restoring_again_changes_nothing_and_another_windows_record_is_not_used() {
        let aws = FakeAws::default();
        aws.template("lt-1", &[NEW, NEW], 2);
        aws.group("web", "lt-1", "$Default", NEW, 1);
        let record = Record {
            ami: NEW.into(),
            window: "2026-12-05T06:00:00Z".into(),
            moved: vec![Moved {
                template: "lt-1".into(),
                before: 1,
                set: 2,
            }],
        };
        aws.set_tags("web", &[(RESTORE_TAG, record.render().as_str())])
            .await
            .unwrap();
        let mark = Mark {
            ami: NEW.into(),
            state: MarkState::InProgress,
            refresh_id: "ir-1".into(),
            deadline: record.window.clone(),
            parameter: "/golden/al2023/ami-id".into(),
        };
        // A refresh of another window (a later one that moved nothing) puts nothing back.
        let later = Mark {
            deadline: "2026-12-12T06:00:00Z".into(),
            ..mark.clone()
        };
        assert_eq!(
            restore(&aws, "web", &later, Outcome::Failed).await.unwrap(),
            None
        );
        // Nor does a success.
        assert_eq!(
            restore(&aws, "web", &mark, Outcome::Succeeded)
                .await
                .unwrap(),
            None
        );
        let first = restore(&aws, "web", &mark, Outcome::RolledBack)
            .await
            .unwrap();
        let again = restore(&aws, "web", &mark, Outcome::RolledBack)
            .await
            .unwrap();
        assert_eq!(
            (first.as_deref(), again.as_deref()),
            (
                Some("the default version of lt-1 was set back to 1 (from 2)"),
                Some("the default version of lt-1 is back at 1")
            )
        );
        let moves: Vec<String> = aws
            .changes()
            .into_iter()
            .filter(|c| c.starts_with("set_default_version"))
            .collect();
        assert_eq!(moves, ["set_default_version lt-1 1"]);
    }

    #[test]
    fn the_record_reads_back_as_written() {
        let record = Record {
            ami: "ami-0000000000000000b".into(),
            window: "2026-12-01T10:00:00Z".into(),
            moved: vec![
                Moved {
                    template: "lt-0123456789abcdef0".into(),
                    before: 3,
                    set: 4,
                },
                Moved {
                    template: "web/overrides_(arm)".into(),
                    before: 1,
                    set: 2,
                },
            ],
        };
        let value = record.render();
        assert_eq!(
            value,
            "ami-0000000000000000b|2026-12-01T10:00:00Z|lt-0123456789abcdef0:3:4|web/overrides_(arm):1:2"
        );
        assert_eq!(Record::parse(&value), Some(record));
        assert_eq!(Record::parse(""), None);
        assert_eq!(Record::parse("ami-1|-|lt-1:x:2"), None);
    }

    #[test]
    fn templates_beyond_one_tag_value_are_left_out_not_cut() {
        let long = |i: usize| Moved {
            template: format!("{i}{}", "t".repeat(100)),
            before: 1,
            set: 2,
        };
        let record = Record {
            ami: "ami-0000000000000000b".into(),
            window: "-".into(),
            moved: vec![long(1), long(2), long(3)],
        };
        let value = record.render();
        assert!(value.len() <= TAG_VALUE_MAX, "{}", value.len());
        let read = Record::parse(&value).unwrap();
        assert_eq!(read.moved, vec![long(1), long(2)]);
    }
}
