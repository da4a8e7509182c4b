//! KMS grants: a spoke's Auto Scaling may use the customer-managed key of a golden AMI's snapshots.

use runtime::StepError;

pub trait Keys: Send + Sync {
    /// Make sure `grantee` may use `key` for EBS (decrypt, re-encrypt, create grants).
    fn ensure_grant(
        &self,
        key: &str,
        grantee: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

#[derive(Clone)]
pub struct KmsKeys(pub aws_sdk_kms::Client);

impl Keys for KmsKeys {
    async fn ensure_grant(&self, key: &str, grantee: &str, name: &str) -> Result<(), StepError> {
        use aws_sdk_kms::types::GrantOperation as Op;
        let grants = self
            .0
            .list_grants()
            .key_id(key)
            .send()
            .await
            .map_err(|e| StepError::from_sdk("kms:ListGrants", &e))?;
        if grants
            .grants()
            .iter()
            .any(|g| g.grantee_principal() == Some(grantee) && g.name() == Some(name))
        {
            return Ok(());
        }
        self.0
            .create_grant()
            .key_id(key)
            .grantee_principal(grantee)
            .name(name)
            .set_operations(Some(vec![
                Op::Decrypt,
                Op::DescribeKey,
                Op::CreateGrant,
                Op::ReEncryptFrom,
                Op::ReEncryptTo,
                Op::GenerateDataKeyWithoutPlaintext,
            ]))
            .send()
            .await
            .map_err(|e| StepError::from_sdk("kms:CreateGrant", &e))?;
        Ok(())
    }
}
