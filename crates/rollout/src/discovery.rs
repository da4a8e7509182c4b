//! Desired state versus actual state: which AMI each group really launches, and whether that
//! makes it current, stale (an earlier value of the golden parameter), skipped or none of ours.
//! Shared by the plan worker and `amictl status`, so both judge a group the same way.

use std::collections::HashMap;

use runtime::StepError;

use crate::aws::{Group, Groups, LaunchSource, Parameters};

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
}

/// Resolves effective AMIs, caching template versions and parameters across groups.
#[derive(Default)]
pub struct Resolver {
    versions: HashMap<(String, String), Option<(i64, String)>>,
    parameters: HashMap<String, Option<String>>,
}

impl Resolver {
    pub async fn resolve(
        &mut self,
        groups: &impl Groups,
        params: &impl Parameters,
        group: Group,
    ) -> Result<GroupAmi, StepError> {
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
                let key = (id.clone(), version.clone());
                if !self.versions.contains_key(&key) {
                    let found = groups
                        .template_version(id, version)
                        .await?
                        .map(|v| (v.number, v.image_id));
                    self.versions.insert(key.clone(), found);
                }
                match self.versions[&key].clone() {
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
                                    template: id.clone(),
                                    spec: version.clone(),
                                    number,
                                    parameter,
                                },
                            )
                        }
                        None => (
                            Some(image),
                            AmiSource::Template {
                                template: id.clone(),
                                spec: version.clone(),
                                number,
                                mixed: mixed.is_some(),
                            },
                        ),
                    },
                }
            }
        };
        Ok(GroupAmi { group, ami, source })
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
    if ami == current {
        Verdict::Current
    } else {
        Verdict::Stale
    }
}
