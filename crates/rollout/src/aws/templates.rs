//! Launch template versions (EC2): the version a group names, the one made for an AMI, a new
//! version from the current one, and the default version of `$Default` groups.

use aws_sdk_ec2::types::{Filter, RequestLaunchTemplateData};
use runtime::StepError;

use super::code_of;
use super::groups::AwsGroups;

/// One launch template version, as much as amiflow reads of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateVersion {
    pub number: i64,
    pub image_id: String,
    pub is_default: bool,
    /// The version's description (amiflow records in it what a version it made is for:
    /// `crate::refresh::default_version`).
    pub description: String,
}

/// A version with the template it belongs to, from a listing of every template of the account.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedVersion {
    pub template_id: String,
    pub template_name: String,
    pub version: TemplateVersion,
}

pub trait Templates: Send + Sync {
    /// A version by number, `$Latest` or `$Default`.
    fn template_version(
        &self,
        template: &str,
        version: &str,
    ) -> impl Future<Output = Result<Option<TemplateVersion>, StepError>> + Send;
    /// Every template's `$Latest` (or `$Default`) version: a paged listing of the account (200
    /// templates a call, at most `max_calls` calls), the cheap way to resolve many groups at once.
    fn every_version(
        &self,
        which: &str,
        max_calls: usize,
    ) -> impl Future<Output = Result<Vec<ListedVersion>, StepError>> + Send;
    /// The newest version whose image is `ami`.
    fn version_with_image(
        &self,
        template: &str,
        ami: &str,
    ) -> impl Future<Output = Result<Option<TemplateVersion>, StepError>> + Send;
    /// A new version of `template` from `source` with `ami`, described by `description`.
    fn create_version(
        &self,
        template: &str,
        source: i64,
        ami: &str,
        description: &str,
    ) -> impl Future<Output = Result<i64, StepError>> + Send;
    fn set_default_version(
        &self,
        template: &str,
        version: i64,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

fn template_filter(template: &str) -> (Option<String>, Option<String>) {
    if template.starts_with("lt-") {
        (Some(template.to_owned()), None)
    } else {
        (None, Some(template.to_owned()))
    }
}

fn read_version(v: &aws_sdk_ec2::types::LaunchTemplateVersion) -> TemplateVersion {
    TemplateVersion {
        number: v.version_number().unwrap_or_default(),
        image_id: v
            .launch_template_data()
            .and_then(|d| d.image_id())
            .unwrap_or_default()
            .to_owned(),
        is_default: v.default_version().unwrap_or(false),
        description: v.version_description().unwrap_or_default().to_owned(),
    }
}

/// The idempotency token of a new version (`ClientToken`, at most 64 ASCII characters): the same
/// request always carries the same token, so a retry whose first reply was lost (the version was
/// made) gets that version back from EC2 instead of making a second one.
fn version_token(template: &str, source: i64, ami: &str, description: &str) -> String {
    let request = format!("{template}\n{source}\n{ami}\n{description}");
    let ami: String = ami
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(21)
        .collect();
    format!(
        "amiflow-{ami}-{:016x}",
        super::marks::fnv1a(request.as_bytes())
    )
}

impl Templates for AwsGroups {
    async fn template_version(
        &self,
        template: &str,
        version: &str,
    ) -> Result<Option<TemplateVersion>, StepError> {
        let (id, name) = template_filter(template);
        let out = match self
            .ec2
            .describe_launch_template_versions()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .versions(version)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if code_of(&e).is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(StepError::from_sdk(
                    "ec2:DescribeLaunchTemplateVersions",
                    &e,
                ));
            }
        };
        Ok(out.launch_template_versions().first().map(read_version))
    }

    async fn every_version(
        &self,
        which: &str,
        max_calls: usize,
    ) -> Result<Vec<ListedVersion>, StepError> {
        let mut pages = self
            .ec2
            .describe_launch_template_versions()
            .versions(which)
            .max_results(200)
            .into_paginator()
            .send();
        let mut listed = Vec::new();
        for _ in 0..max_calls {
            let Some(page) = pages.next().await else {
                break;
            };
            let page =
                page.map_err(|e| StepError::from_sdk("ec2:DescribeLaunchTemplateVersions", &e))?;
            listed.extend(page.launch_template_versions().iter().filter_map(|v| {
                Some(ListedVersion {
                    template_id: v.launch_template_id()?.to_owned(),
                    template_name: v.launch_template_name().unwrap_or_default().to_owned(),
                    version: read_version(v),
                })
            }));
        }
        Ok(listed)
    }

    async fn version_with_image(
        &self,
        template: &str,
        ami: &str,
    ) -> Result<Option<TemplateVersion>, StepError> {
        let (id, name) = template_filter(template);
        let out = self
            .ec2
            .describe_launch_template_versions()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .filters(Filter::builder().name("image-id").values(ami).build())
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:DescribeLaunchTemplateVersions", &e))?;
        Ok(out
            .launch_template_versions()
            .iter()
            .map(read_version)
            .max_by_key(|v| v.number))
    }

    async fn create_version(
        &self,
        template: &str,
        source: i64,
        ami: &str,
        description: &str,
    ) -> Result<i64, StepError> {
        let (id, name) = template_filter(template);
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        let out = self
            .ec2
            .create_launch_template_version()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .source_version(source.to_string())
            .version_description(description)
            .launch_template_data(RequestLaunchTemplateData::builder().image_id(ami).build())
            .client_token(version_token(template, source, ami, description))
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:CreateLaunchTemplateVersion", &e))?;
        Ok(out
            .launch_template_version()
            .and_then(|v| v.version_number())
            .unwrap_or_default())
    }

    async fn set_default_version(&self, template: &str, version: i64) -> Result<(), StepError> {
        let (id, name) = template_filter(template);
        runtime::limits::acquire(runtime::limits::Api::Ec2Mutating).await;
        self.ec2
            .modify_launch_template()
            .set_launch_template_id(id)
            .set_launch_template_name(name)
            .default_version(version.to_string())
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ec2:ModifyLaunchTemplate", &e))?;
        Ok(())
    }
}
