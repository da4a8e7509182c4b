//! Desired state versus actual state: which AMI each group really launches, and whether that
//! makes it current, stale (an earlier value of the golden parameter), skipped or none of ours.
//! Shared by the plan worker and `amictl status`, so both judge a group the same way.
//!
//! A group launches from every launch template it names: its main one and, in a mixed-instances
//! policy, each override that names a template of its own (AWS launches that instance type from
//! it). Each is resolved (`$Latest`, `$Default`, `resolve:ssm:`), and a group is current only when
//! none of them still holds an earlier golden AMI of the family. A template on an AMI of no golden
//! family is left alone; an override whose template cannot be read makes the group broken, with
//! the reason.

use std::collections::HashMap;

use runtime::StepError;

use aws_sdk_autoscaling::types::MixedInstancesPolicy;

use crate::aws::{Group, Groups, LaunchSource, Parameters, Templates};

/// From this many template versions to read, the resolver lists every template's `$Latest` (and
/// `$Default`) version of the account instead, 200 templates a call.
const LIST_FROM: usize = 8;

/// Where a group's AMI comes from, after resolving `$Latest`/`$Default` and `resolve:ssm:`.
#[derive(Debug, Clone, PartialEq)]
pub enum AmiSource {
    /// A launch template version (`spec` as the group names it, `number` what it resolves to).
    Template {
        template: String,
        spec: String,
        number: i64,
        mixed: bool,
    },
    /// A launch template whose `ImageId` is `resolve:ssm:<parameter>`.
    ResolveSsm {
        template: String,
        spec: String,
        number: i64,
        parameter: String,
    },
    LaunchConfiguration(String),
    /// No launch source amiflow can read (deleted template, none at all).
    Missing(String),
}

/// A group with its effective AMI.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAmi {
    pub group: Group,
    pub ami: Option<String>,
    pub source: AmiSource,
    /// The mixed-instances overrides that launch from a template of their own.
    pub overrides: Vec<OverrideAmi>,
}

/// A mixed-instances override that names its own launch template, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideAmi {
    pub instance_type: String,
    pub ami: Option<String>,
    /// `Missing` when the template no longer exists or the override names none.
    pub source: AmiSource,
}

/// An override of a mixed-instances policy with a launch template of its own, as the group names
/// it: (instance type, template id or name, version). `None` for the template when the
/// specification names neither an id nor a name.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideTemplate {
    pub instance_type: String,
    pub template: Option<String>,
    pub version: String,
}

/// The overrides of `mixed` that launch from their own template.
pub fn override_templates(mixed: &MixedInstancesPolicy) -> Vec<OverrideTemplate> {
    mixed
        .launch_template()
        .map(|lt| lt.overrides())
        .unwrap_or_default()
        .iter()
        .filter_map(|o| {
            let spec = o.launch_template_specification()?;
            Some(OverrideTemplate {
                instance_type: o.instance_type().unwrap_or("(no instance type)").to_owned(),
                template: spec
                    .launch_template_id()
                    .or(spec.launch_template_name())
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
                version: spec.version().unwrap_or("$Default").to_owned(),
            })
        })
        .collect()
}

impl GroupAmi {
    /// The AMI of every template the group can launch from (main first); `None` where unreadable.
    pub fn template_amis(&self) -> impl Iterator<Item = Option<&String>> {
        std::iter::once(self.ami.as_ref()).chain(self.overrides.iter().map(|o| o.ami.as_ref()))
    }

    /// The AMI instance `id` runs, where Auto Scaling's own record of its launch says it exactly:
    /// launched from a numbered version of a template the group (or one of its overrides) names
    /// by id, the very version that template resolves to now, whose image is an AMI id (a
    /// `resolve:ssm:` image resolves at each launch, so it is never known this way). Template
    /// versions never change, so that instance runs that version's AMI. `None` means "read the
    /// instance": launched as `$Latest` or `$Default`, from another version, or from a
    /// launch configuration.
    pub fn launched_ami(&self, id: &str) -> Option<&String> {
        let matches = |source: &AmiSource| {
            matches!(source, AmiSource::Template { template, number, .. }
                if self.group.launched_from_version(id, template, *number))
        };
        if matches(&self.source) {
            return self.ami.as_ref();
        }
        self.overrides
            .iter()
            .find(|o| matches(&o.source))
            .and_then(|o| o.ami.as_ref())
    }

    /// Why an override cannot be launched from, if one cannot.
    pub fn broken_override(&self) -> Option<String> {
        self.overrides.iter().find_map(|o| match &o.source {
            AmiSource::Missing(why) => Some(format!(
                "the mixed-instances override for {}: {why}; fix the group's MixedInstancesPolicy",
                o.instance_type
            )),
            _ => None,
        })
    }
}

/// Resolves effective AMIs, caching template versions and parameters across groups.
#[derive(Default)]
pub struct Resolver {
    versions: HashMap<(String, String), Option<(i64, String)>>,
    parameters: HashMap<String, Option<String>>,
    /// The account's groups, as first listed.
    listed: Option<Vec<Group>>,
}

impl Resolver {
    /// The account's groups: listed by the first call, the same listing after (judging the same
    /// groups again, as if a golden parameter held another AMI, lists them once).
    pub async fn groups(&mut self, groups: &impl Groups) -> Result<Vec<Group>, StepError> {
        if let Some(listed) = &self.listed {
            return Ok(listed.clone());
        }
        let listed = groups.list().await?;
        self.listed = Some(listed.clone());
        Ok(listed)
    }

    /// Forget the parameter values read so far, keeping the template versions: judging the same
    /// groups again against other parameters (`amictl plan --ami`: as if a golden parameter held
    /// another AMI) reads no version twice, and each `resolve:ssm:` value from the new ones.
    pub fn forget_parameters(&mut self) {
        self.parameters.clear();
    }

    /// Read ahead, in one listing of the account per kind, the `$Latest` and `$Default` versions
    /// of the templates `groups` launch from (main and overrides); a pinned version that is its
    /// template's latest or default comes with them. Only when that saves calls: below
    /// [`LIST_FROM`] versions to read nothing is listed, and a listing stops after a quarter as
    /// many calls as versions it would save (a large account of templates no group uses), the
    /// rest then read one by one as before.
    pub async fn prefetch(
        &mut self,
        templates: &impl Templates,
        groups: &[Group],
    ) -> Result<(), StepError> {
        let mut wanted: Vec<(String, String)> = Vec::new();
        for g in groups {
            if let LaunchSource::Template { id, version, mixed } = &g.source {
                wanted.push((id.clone(), version.clone()));
                for o in mixed.as_deref().map(override_templates).unwrap_or_default() {
                    if let Some(template) = o.template {
                        wanted.push((template, o.version));
                    }
                }
            }
        }
        wanted.retain(|k| !self.versions.contains_key(k));
        wanted.sort();
        wanted.dedup();
        if wanted.len() < LIST_FROM {
            return Ok(());
        }
        let max_calls = wanted.len().div_ceil(4);
        for which in ["$Latest", "$Default"] {
            if !wanted
                .iter()
                .any(|(_, v)| v == which || v.parse::<i64>().is_ok())
            {
                continue;
            }
            for listed in templates.every_version(which, max_calls).await? {
                let found = Some((listed.version.number, listed.version.image_id.clone()));
                for template in [&listed.template_id, &listed.template_name] {
                    for spec in [which.to_owned(), listed.version.number.to_string()] {
                        self.versions
                            .insert((template.clone(), spec), found.clone());
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn resolve(
        &mut self,
        groups: &impl Groups,
        params: &impl Parameters,
        group: Group,
    ) -> Result<GroupAmi, StepError> {
        let mut overrides = Vec::new();
        let (ami, source) = match &group.source {
            LaunchSource::LaunchConfiguration(name) => (
                groups.launch_configuration_image(name).await?,
                AmiSource::LaunchConfiguration(name.clone()),
            ),
            LaunchSource::None => (
                None,
                AmiSource::Missing("the group has no launch template or configuration".into()),
            ),
            LaunchSource::Template { id, version, mixed } => {
                for o in mixed.as_deref().map(override_templates).unwrap_or_default() {
                    let (ami, source) = match &o.template {
                        Some(template) => {
                            self.template(groups, params, template, &o.version, false)
                                .await?
                        }
                        None => (
                            None,
                            AmiSource::Missing(
                                "its launch template specification names no template".into(),
                            ),
                        ),
                    };
                    overrides.push(OverrideAmi {
                        instance_type: o.instance_type,
                        ami,
                        source,
                    });
                }
                self.template(groups, params, id, version, mixed.is_some())
                    .await?
            }
        };
        Ok(GroupAmi {
            group,
            ami,
            source,
            overrides,
        })
    }

    /// The AMI a template version launches, cached across groups.
    async fn template(
        &mut self,
        groups: &impl Groups,
        params: &impl Parameters,
        id: &str,
        version: &str,
        mixed: bool,
    ) -> Result<(Option<String>, AmiSource), StepError> {
        let key = (id.to_owned(), version.to_owned());
        if !self.versions.contains_key(&key) {
            let found = groups
                .template_version(id, version)
                .await?
                .map(|v| (v.number, v.image_id));
            self.versions.insert(key.clone(), found);
        }
        Ok(match self.versions[&key].clone() {
            None => (
                None,
                AmiSource::Missing(format!(
                    "launch template {id} version {version} does not exist"
                )),
            ),
            Some((number, image)) => match image.strip_prefix("resolve:ssm:") {
                Some(parameter) => {
                    let parameter = parameter.to_owned();
                    if !self.parameters.contains_key(&parameter) {
                        let value = params.get(&parameter).await?.map(|p| p.value);
                        self.parameters.insert(parameter.clone(), value);
                    }
                    let ami = self.parameters[&parameter].clone();
                    (
                        ami,
                        AmiSource::ResolveSsm {
                            template: id.to_owned(),
                            spec: version.to_owned(),
                            number,
                            parameter,
                        },
                    )
                }
                None => (
                    Some(image),
                    AmiSource::Template {
                        template: id.to_owned(),
                        spec: version.to_owned(),
                        number,
                        mixed,
                    },
                ),
            },
        })
    }
}

/// How a group stands against one golden parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Current,
    /// On an earlier golden AMI of the family: to be refreshed.
    Stale,
    /// Ours, but deliberately left alone (skip tag), with the reason.
    Skipped(String),
    /// Not of this family (another family's AMI, or no readable AMI), with the reason.
    Untouched(String),
    /// Ours, but one of the templates it launches from cannot be read (an override naming a
    /// template that no longer exists, or none): nothing can be moved until it is fixed.
    Broken(String),
}

/// Judge a group against the parameter's current value and its history (earlier values).
pub fn verdict(g: &GroupAmi, current: &str, history: &[String], skip_tag: &str) -> Verdict {
    let Some(ami) = &g.ami else {
        return Verdict::Untouched(match &g.source {
            AmiSource::Missing(why) => why.clone(),
            _ => "no AMI could be read for the group".into(),
        });
    };
    let is_ours = ami == current || history.iter().any(|h| h == ami);
    if !is_ours {
        return Verdict::Untouched(format!(
            "runs {ami}, which is not a golden AMI of this family"
        ));
    }
    if g.group.tags.get(skip_tag).is_some_and(|v| v != "false") {
        return Verdict::Skipped(format!("tagged {skip_tag}"));
    }
    if let Some(why) = g.broken_override() {
        return Verdict::Broken(why);
    }
    // Every template on an earlier golden AMI is to move; one on another AMI is left alone.
    let earlier = |a: &String| a != current && history.iter().any(|h| h == a);
    if g.template_amis().flatten().any(earlier) {
        Verdict::Stale
    } else {
        Verdict::Current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;
    use aws_sdk_autoscaling::types::{
        LaunchTemplate, LaunchTemplateOverrides, LaunchTemplateSpecification,
    };

    const OLD: &str = "ami-0000000000000000a";
    const NEW: &str = "ami-0000000000000000b";
    const WIN: &str = "ami-00000000000000win";

    fn mixed_group(overrides: Vec<LaunchTemplateOverrides>) -> Group {
        let policy = MixedInstancesPolicy::builder()
            .launch_template(
                LaunchTemplate::builder()
                    .launch_template_specification(
                        LaunchTemplateSpecification::builder()
                            .launch_template_id("lt-main")
                            .version("1")
                            .build(),
                    )
                    .set_overrides(Some(overrides))
                    .build(),
            )
            .build();
        Group {
            name: "web".into(),
            source: LaunchSource::Template {
                id: "lt-main".into(),
                version: "1".into(),
                mixed: Some(Box::new(policy)),
            },
            tags: Default::default(),
            instance_ids: vec![],
            launched_from: Default::default(),
        }
    }

    fn override_with(template: Option<&str>, version: Option<&str>) -> LaunchTemplateOverrides {
        let mut spec = LaunchTemplateSpecification::builder().set_version(version.map(Into::into));
        if let Some(t) = template {
            spec = spec.launch_template_id(t);
        }
        LaunchTemplateOverrides::builder()
            .instance_type("t3.small")
            .launch_template_specification(spec.build())
            .build()
    }

    async fn judge(aws: &FakeAws, group: Group) -> Verdict {
        let g = Resolver::default().resolve(aws, aws, group).await.unwrap();
        verdict(&g, NEW, &[OLD.into(), NEW.into()], "amiflow:skip")
    }

    #[tokio::test]
    async fn a_group_is_judged_by_every_template_it_can_launch_from() {
        let aws = FakeAws::default();
        aws.template("lt-main", &[NEW], 1);
        aws.template("lt-old", &[OLD, NEW], 2);
        aws.template("lt-win", &[WIN], 1);
        // The main template is current, the override's $Default is an earlier golden AMI.
        let stale = mixed_group(vec![
            override_with(Some("lt-old"), Some("1")),
            LaunchTemplateOverrides::builder()
                .instance_type("t3.micro")
                .build(),
        ]);
        assert_eq!(judge(&aws, stale).await, Verdict::Stale);
        // Overrides on the new AMI ($Default is 2), or on another family's AMI (left alone).
        let current = mixed_group(vec![
            override_with(Some("lt-old"), None),
            override_with(Some("lt-win"), Some("$Latest")),
        ]);
        assert_eq!(judge(&aws, current).await, Verdict::Current);
    }

    #[tokio::test]
    async fn an_override_whose_template_cannot_be_read_makes_the_group_broken() {
        let aws = FakeAws::default();
        aws.template("lt-main", &[OLD], 1);
        let gone = mixed_group(vec![override_with(Some("lt-gone"), Some("1"))]);
        assert_eq!(
            judge(&aws, gone).await,
            Verdict::Broken(
                "the mixed-instances override for t3.small: launch template lt-gone version 1 does not exist; fix the group's MixedInstancesPolicy".into()
            )
        );
        let nameless = mixed_group(vec![override_with(None, Some("1"))]);
        assert_eq!(
            judge(&aws, nameless).await,
            Verdict::Broken(
                "the mixed-instances override for t3.small: its launch template specification names no template; fix the group's MixedInstancesPolicy".into()
            )
        );
    }

    /// Many groups are resolved from one listing per kind, to exactly what reading each version
    /// alone gives, and a version the listing does not hold (an older pinned one, a deleted
    /// template) is still read alone.
    #[tokio::test]
    async fn many_groups_are_resolved_from_one_listing_to_what_single_reads_give() {
        use std::sync::atomic::Ordering::Relaxed;
        let aws = FakeAws::default();
        let specs = ["$Latest", "$Default", "3", "1", "2"];
        for i in 0..20 {
            // Versions 1 OLD, 2 NEW (the default), 3 OLD (a draft): $Latest and $Default differ.
            aws.template(&format!("lt-{i}"), &[OLD, NEW, OLD], 2);
            aws.group(
                &format!("g{i}"),
                &format!("lt-{i}"),
                specs[i % specs.len()],
                OLD,
                1,
            );
        }
        aws.group("gone", "lt-deleted", "$Latest", OLD, 1);
        let groups: Vec<Group> = aws.groups.lock().unwrap().values().cloned().collect();

        let mut alone = Resolver::default();
        let mut expected = Vec::new();
        for g in &groups {
            expected.push(alone.resolve(&aws, &aws, g.clone()).await.unwrap());
        }
        let single_reads = aws.template_reads.swap(0, Relaxed);
        assert_eq!(single_reads, groups.len());

        let mut listed = Resolver::default();
        listed.prefetch(&aws, &groups).await.unwrap();
        let mut got = Vec::new();
        for g in &groups {
            got.push(listed.resolve(&aws, &aws, g.clone()).await.unwrap());
        }
        assert_eq!(got, expected);
        // Two listings ($Latest, $Default), then the four groups pinned at version 1 (neither
        // latest nor default) one read each, and the deleted template one.
        assert_eq!(aws.template_reads.load(Relaxed), 2 + 4 + 1);
        assert!(matches!(
            &got.iter().find(|g| g.group.name == "gone").unwrap().source,
            AmiSource::Missing(why) if why == "launch template lt-deleted version $Latest does not exist"
        ));

        // A handful of groups is read one by one: no listing of the whole account.
        aws.template_reads.store(0, Relaxed);
        let mut few = Resolver::default();
        few.prefetch(&aws, &groups[..3]).await.unwrap();
        assert_eq!(aws.template_reads.load(Relaxed), 0);
    }
}
