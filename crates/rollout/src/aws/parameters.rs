//! SSM golden parameters: read, written as `aws:ec2:image`, and their history.

use aws_sdk_ssm::types::ParameterType;
use runtime::StepError;

use super::code_of;

#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue {
    pub value: String,
    pub version: i64,
    pub data_type: String,
}

/// An account's SSM parameters: its golden parameters, and (the same service, read and written by
/// the same steps) the parameters that keep the marks of stack-owned groups.
pub trait Parameters: super::MarkParameters + Send + Sync {
    fn get(&self, name: &str)
    -> impl Future<Output = Result<Option<ParamValue>, StepError>> + Send;
    /// Write an `aws:ec2:image` value (overwriting); returns the new version.
    fn put_image(
        &self,
        name: &str,
        ami: &str,
    ) -> impl Future<Output = Result<i64, StepError>> + Send;
    /// Every value the parameter ever held, oldest first.
    fn history(&self, name: &str) -> impl Future<Output = Result<Vec<String>, StepError>> + Send;
}

#[derive(Clone)]
pub struct SsmParameters(pub aws_sdk_ssm::Client);

impl Parameters for SsmParameters {
    async fn get(&self, name: &str) -> Result<Option<ParamValue>, StepError> {
        match self.0.get_parameter().name(name).send().await {
            Ok(out) => Ok(out.parameter().map(|p| ParamValue {
                value: p.value().unwrap_or_default().to_owned(),
                version: p.version(),
                data_type: p.data_type().unwrap_or("text").to_owned(),
            })),
            Err(e) if code_of(&e) == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(StepError::from_sdk("ssm:GetParameter", &e)),
        }
    }

    async fn put_image(&self, name: &str, ami: &str) -> Result<i64, StepError> {
        runtime::limits::acquire(runtime::limits::Api::SsmPutParameter).await;
        let out = self
            .0
            .put_parameter()
            .name(name)
            .value(ami)
            .r#type(ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("ssm:PutParameter", &e))?;
        Ok(out.version())
    }

    async fn history(&self, name: &str) -> Result<Vec<String>, StepError> {
        let mut pages = self
            .0
            .get_parameter_history()
            .name(name)
            .max_results(50)
            .into_paginator()
            .send();
        let mut values = Vec::new();
        while let Some(page) = pages.next().await {
            match page {
                Ok(page) => values.extend(
                    page.parameters()
                        .iter()
                        .filter_map(|p| p.value().map(str::to_owned)),
                ),
                Err(e) if code_of(&e) == Some("ParameterNotFound") => return Ok(Vec::new()),
                Err(e) => return Err(StepError::from_sdk("ssm:GetParameterHistory", &e)),
            }
        }
        Ok(values)
    }
}
