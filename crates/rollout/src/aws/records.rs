//! amiflow's own records in SSM Parameter Store (String parameters under `/amiflow/`, each a JSON
//! document): promotions, pauses, approvals, resumes, recalls, and the marks of stack-owned groups
//! (`aws::marks`). Parameter Store keeps every version with the identity that wrote it
//! (`LastModifiedUser`), so the console shows who changed what and when.

use aws_sdk_ssm::types::ParameterType;
use runtime::StepError;

use super::code_of;

/// One record as stored: its name, its JSON text, and who wrote this version.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub name: String,
    pub value: String,
    /// The ARN SSM recorded as the writer of this version (`None` where the API does not say).
    pub written_by: Option<String>,
}

pub trait Records: Send + Sync {
    /// The record at `name`; `None` when there is none.
    fn read_record(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, StepError>> + Send;
    /// Every record under `path` (recursively).
    fn list_records(
        &self,
        path: &str,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, StepError>> + Send;
    /// Write (or overwrite) the record at `name`.
    fn write_record(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    /// Delete the record at `name`; deleting what is not there is success.
    fn remove_record(&self, name: &str) -> impl Future<Output = Result<(), StepError>> + Send;
}

#[derive(Clone)]
pub struct SsmRecords(pub aws_sdk_ssm::Client);

impl Records for SsmRecords {
    async fn read_record(&self, name: &str) -> Result<Option<String>, StepError> {
        match self.0.get_parameter().name(name).send().await {
            Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_owned)),
            Err(e) if code_of(&e) == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(StepError::from_sdk("ssm:GetParameter", &e)),
        }
    }

    async fn list_records(&self, path: &str) -> Result<Vec<StoredRecord>, StepError> {
        let mut pages = self
            .0
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| StepError::from_sdk("ssm:GetParametersByPath", &e))?;
            for p in page.parameters() {
                if let (Some(name), Some(value)) = (p.name(), p.value()) {
                    found.push(StoredRecord {
                        name: name.to_owned(),
                        value: value.to_owned(),
                        written_by: None,
                    });
                }
            }
        }
        Ok(found)
    }

    async fn write_record(&self, name: &str, value: &str) -> Result<(), StepError> {
        runtime::limits::acquire(runtime::limits::Api::SsmPutParameter).await;
        self.0
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ssm:PutParameter", &e))?;
        Ok(())
    }

    async fn remove_record(&self, name: &str) -> Result<(), StepError> {
        match self.0.delete_parameter().name(name).send().await {
            Ok(_) => Ok(()),
            Err(e) if code_of(&e) == Some("ParameterNotFound") => Ok(()),
            Err(e) => Err(StepError::from_sdk("ssm:DeleteParameter", &e)),
        }
    }
}
