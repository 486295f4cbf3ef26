//! What one request may do with the cloud, from its API key's policy, the
//! configured default, and the `x-llmesh-cloud: never` header.

use crate::config::CloudPolicyName;

/// Why a request would go to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// No node of the mesh has the model.
    Absent,
    /// Every node that has it is busy for longer than the overflow limit.
    Overflow,
    /// Every node that has it failed.
    Failover,
    /// The key prefers the cloud for this model.
    Prefer,
}

/// A request's cloud permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudPolicy {
    /// The policy in force.
    pub policy: CloudPolicyName,
    /// Where it comes from, for error messages ("API key key_x", "the
    /// x-llmesh-cloud header", "cloud.default_policy").
    pub source: String,
    /// Whether this request's model goes to the cloud first.
    pub prefer: bool,
}

impl Default for CloudPolicy {
    fn default() -> Self {
        CloudPolicy { policy: CloudPolicyName::Never, source: "no cloud provider is configured".into(), prefer: false }
    }
}

impl CloudPolicy {
    /// Whether `trigger` may send this request to the cloud.
    pub fn allows(&self, trigger: Trigger) -> bool {
        use CloudPolicyName::{Allowed, Failover, Never, Overflow};
        match (self.policy, trigger) {
            (Never, _) => false,
            (_, Trigger::Absent) => true,
            (_, Trigger::Prefer) => self.prefer,
            (Overflow | Allowed, Trigger::Overflow) => true,
            (Failover | Allowed, Trigger::Failover) => true,
            _ => false,
        }
    }

    /// Why the cloud was not used, for the client's error message.
    pub fn refusal(&self) -> String {
        let name = match self.policy {
            CloudPolicyName::Never => "never",
            CloudPolicyName::Overflow => "overflow",
            CloudPolicyName::Failover => "failover",
            CloudPolicyName::Allowed => "allowed",
        };
        format!("the cloud is not allowed for it (cloud policy '{name}' from {})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(p: CloudPolicyName, prefer: bool) -> CloudPolicy {
        CloudPolicy { policy: p, source: "test".into(), prefer }
    }

    #[test]
    fn each_policy_allows_its_triggers() {
        use Trigger::*;
        let table = [
            (CloudPolicyName::Never, [false, false, false]),
            (CloudPolicyName::Overflow, [true, true, false]),
            (CloudPolicyName::Failover, [true, false, true]),
            (CloudPolicyName::Allowed, [true, true, true]),
        ];
        for (p, [absent, overflow, failover]) in table {
            let request = policy(p, false);
            assert_eq!(request.allows(Absent), absent, "{p:?} absent");
            assert_eq!(request.allows(Overflow), overflow, "{p:?} overflow");
            assert_eq!(request.allows(Failover), failover, "{p:?} failover");
            assert!(!request.allows(Prefer));
        }
        assert!(policy(CloudPolicyName::Failover, true).allows(Prefer));
        assert!(!policy(CloudPolicyName::Never, true).allows(Prefer));
        assert!(policy(CloudPolicyName::Never, false).refusal().contains("'never' from test"));
    }
}
