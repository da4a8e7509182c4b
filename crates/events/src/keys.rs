//! Idempotency keys and rollout ids, derived only from business fields (never from time or
//! message ids), so the same step always gets the same key however often it is delivered.

/// One rollout of one AMI for one golden parameter: `<parameter name>@<ami id>`.
pub fn rollout_id(parameter_name: &str, ami_id: &str) -> String {
    format!("{parameter_name}@{ami_id}")
}

pub fn built(ami_id: &str) -> String {
    format!("built:{ami_id}")
}

pub fn shared(ami_id: &str, target_account: &str) -> String {
    format!("shared:{ami_id}:{target_account}")
}

pub fn param(account: &str, parameter_name: &str, ami_id: &str) -> String {
    format!("param:{account}:{parameter_name}:{ami_id}")
}

/// `date` is the window's opening day (`YYYY-MM-DD`): one window per stage and day.
pub fn window(account: &str, stage: &str, date: &str) -> String {
    format!("window:{account}:{stage}:{date}")
}

pub fn refresh(account: &str, asg_name: &str, ami_id: &str) -> String {
    format!("refresh:{account}:{asg_name}:{ami_id}")
}

pub fn finished(account: &str, asg_name: &str, ami_id: &str) -> String {
    format!("finished:{account}:{asg_name}:{ami_id}")
}

/// One recall of one AMI: an AMI is recalled once.
pub fn recalled(ami_id: &str) -> String {
    format!("recalled:{ami_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_only_on_business_fields() {
        assert_eq!(
            rollout_id("/golden/al2023/ami-id", "ami-0abc1234"),
            "/golden/al2023/ami-id@ami-0abc1234"
        );
        assert_eq!(shared("ami-1", "222222222222"), "shared:ami-1:222222222222");
        assert_eq!(param("1", "/p", "ami-1"), "param:1:/p:ami-1");
        assert_eq!(window("1", "qa", "2026-11-07"), "window:1:qa:2026-11-07");
        assert_eq!(refresh("1", "web", "ami-1"), "refresh:1:web:ami-1");
        assert_eq!(finished("1", "web", "ami-1"), "finished:1:web:ami-1");
        assert_eq!(built("ami-1"), built("ami-1"));
        assert_eq!(recalled("ami-1"), "recalled:ami-1");
    }
}
