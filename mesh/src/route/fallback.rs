//! The cloud as the mesh's last resort: which triggers a request's policy
//! allows, and the [`Fallback`] seam the agent's cloud client plugs into.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{InferenceRequest, InferenceResponse, ServeError};

/// Where a request may go when the mesh cannot serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloudPolicyName {
    /// Never: the request stays on the premises.
    Never,
    /// When the model is not in the mesh, or every node is busy for longer
    /// than `cloud.overflow_after`.
    Overflow,
    /// When the model is not in the mesh, or every node that has it failed.
    Failover,
    /// All of the above.
    Allowed,
}

impl CloudPolicyName {
    /// The name as written in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            CloudPolicyName::Never => "never",
            CloudPolicyName::Overflow => "overflow",
            CloudPolicyName::Failover => "failover",
            CloudPolicyName::Allowed => "allowed",
        }
    }
}

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
        format!("the cloud is not allowed for it (cloud policy '{}' from {})", self.policy.as_str(), self.source)
    }
}

/// Cloud providers the mesh may send a request to (the agent's cloud client).
#[async_trait::async_trait]
pub trait Fallback: Send + Sync + 'static {
    /// Whether some provider serves `model`.
    fn maps(&self, model: &str) -> bool;

    /// Expected waits in the mesh from which a request may overflow.
    fn overflow_after(&self) -> Duration;

    /// Runs `req` at a provider; returns the response and the provider's name.
    async fn serve(&self, req: &InferenceRequest) -> Result<(InferenceResponse, String), ServeError>;
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
