//! CloudFormation stacks: a stack-owned group's stack, and the update that lets it re-resolve
//! its SSM-typed AMI parameter.

use aws_sdk_cloudformation::types::{Capability, Parameter as CfnParameter};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use runtime::StepError;

use super::code_of;

/// Tag CloudFormation puts on the groups it owns.
pub const STACK_TAG: &str = "aws:cloudformation:stack-name";

#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub name: String,
    pub status: String,
    /// (key, value as given, resolved value for SSM parameter types)
    pub parameters: Vec<(String, String, Option<String>)>,
}

pub trait Stacks: Send + Sync {
    fn describe(&self, name: &str)
    -> impl Future<Output = Result<Option<Stack>, StepError>> + Send;
    /// `UpdateStack` with the previous template and every previous value; `false` when
    /// CloudFormation says there is nothing to update.
    fn update_with_previous(
        &self,
        stack: &Stack,
    ) -> impl Future<Output = Result<bool, StepError>> + Send;
}

#[derive(Clone)]
pub struct CfnStacks(pub aws_sdk_cloudformation::Client);

impl Stacks for CfnStacks {
    async fn describe(&self, name: &str) -> Result<Option<Stack>, StepError> {
        let out = match self.0.describe_stacks().stack_name(name).send().await {
            Ok(out) => out,
            Err(e) if code_of(&e) == Some("ValidationError") => return Ok(None),
            Err(e) => return Err(StepError::from_sdk("cloudformation:DescribeStacks", &e)),
        };
        Ok(out.stacks().first().map(|s| Stack {
            name: s.stack_name().unwrap_or_default().to_owned(),
            status: s
                .stack_status()
                .map(|st| st.as_str().to_owned())
                .unwrap_or_default(),
            parameters: s
                .parameters()
                .iter()
                .map(|p| {
                    (
                        p.parameter_key().unwrap_or_default().to_owned(),
                        p.parameter_value().unwrap_or_default().to_owned(),
                        p.resolved_value().map(str::to_owned),
                    )
                })
                .collect(),
        }))
    }

    async fn update_with_previous(&self, stack: &Stack) -> Result<bool, StepError> {
        let parameters: Vec<CfnParameter> = stack
            .parameters
            .iter()
            .map(|(key, _, _)| {
                CfnParameter::builder()
                    .parameter_key(key)
                    .use_previous_value(true)
                    .build()
            })
            .collect();
        match self
            .0
            .update_stack()
            .stack_name(&stack.name)
            .use_previous_template(true)
            .set_parameters(Some(parameters))
            .capabilities(Capability::CapabilityIam)
            .capabilities(Capability::CapabilityNamedIam)
            .capabilities(Capability::CapabilityAutoExpand)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            // CloudFormation answers "No updates are to be performed." as a ValidationError; the
            // stack is already where we want it. (Its other ValidationErrors are permanent.)
            Err(e)
                if code_of(&e) == Some("ValidationError")
                    && e.as_service_error()
                        .and_then(|s| s.message())
                        .is_some_and(|m| m.contains("No updates")) =>
            {
                Ok(false)
            }
            Err(e) => Err(StepError::from_sdk("cloudformation:UpdateStack", &e)),
        }
    }
}
