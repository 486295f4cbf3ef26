//! The Admin gRPC service: API keys, routes and node drains for operators.
//! Every call needs the admin credential; writes are proposed through the
//! local node (raft-rs forwards them to the leader) and answer once they
//! are applied here, so a follow-up read on the same node sees them.

use llmesh_proto::admin_server::Admin;
use llmesh_proto::{
    AdminReply, ApiKey, ClusterStatus, Command, CreateKeyReply, CreateKeyRequest, KeyLimits, KeyLimitsUpdate, KeyRef,
    ListKeysReply, ListKeysRequest, ListRoutesReply, ListRoutesRequest, Member, NodeRef, RevokeKey, Route, RouteRef,
    SetDrained, StatusRequest, command,
};
use tonic::{Request, Response, Status};

use super::state::{ApplyError, constant_time_eq, secret_hash};
use super::{Coordinator, ProposeError};
use base64::Engine as _;

/// File in the data directory that holds the admin credential.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Makes a new admin credential (shown to the operator, hashed in the state).
pub fn new_admin_token() -> String {
    format!("lma_{}", random_b64(32))
}

fn random_b64(len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The Admin service of one node.
pub struct AdminService {
    coordinator: Coordinator,
}

impl AdminService {
    /// Serves admin calls through `coordinator`.
    pub fn new(coordinator: Coordinator) -> AdminService {
        AdminService { coordinator }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let state = self.coordinator.state();
        if state.admin_token_sha256.is_empty() {
            return Err(Status::unavailable("this node has not received the cluster state yet; retry"));
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("admin calls need `authorization: Bearer <admin token>`"))?;
        if constant_time_eq(&secret_hash(presented.trim()), &state.admin_token_sha256) {
            Ok(())
        } else {
            Err(Status::permission_denied("wrong admin token"))
        }
    }

    async fn write(&self, kind: command::Kind) -> Result<Response<AdminReply>, Status> {
        let applied = self.coordinator.propose(Command { kind: Some(kind) }).await.map_err(to_status)?;
        Ok(Response::new(AdminReply { index: applied.index, message: applied.message }))
    }

    fn member(&self, reference: &str) -> Result<Member, Status> {
        self.coordinator.state().find_member(reference).cloned().map_err(|e| to_status(ProposeError::Rejected(e)))
    }
}

fn to_status(err: ProposeError) -> Status {
    match err {
        ProposeError::Rejected(ApplyError::NotFound(m)) => Status::not_found(m),
        ProposeError::Rejected(ApplyError::Invalid(m)) => Status::invalid_argument(m),
        ProposeError::NoLeader | ProposeError::Timeout(_) | ProposeError::Stopped => {
            Status::unavailable(err.to_string())
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn check_limits(limits: &KeyLimits) -> Result<(), Status> {
    if !matches!(limits.budget_period.as_str(), "" | "day" | "month") {
        return Err(Status::invalid_argument("budget period must be `day` or `month`"));
    }
    if limits.token_budget > 0 && limits.budget_period.is_empty() {
        return Err(Status::invalid_argument("a token budget needs a period (`day` or `month`)"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<ClusterStatus>, Status> {
        self.authorize(&request)?;
        let status = self.coordinator.status();
        let state = self.coordinator.state();
        let member = |id: &u64| state.members.get(id).cloned().unwrap_or(Member { raft_id: *id, ..Member::default() });
        Ok(Response::new(ClusterStatus {
            raft_id: status.id,
            role: status.role.to_string(),
            leader_id: status.leader,
            leader_name: state.members.get(&status.leader).map(|m| m.name.clone()).unwrap_or_default(),
            term: status.term,
            commit_index: status.commit,
            applied_index: status.applied,
            voters: state.voters.iter().map(member).collect(),
            learners: state.learners.iter().map(member).collect(),
        }))
    }

    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<CreateKeyReply>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let limits = request.limits.unwrap_or_default();
        check_limits(&limits)?;
        let secret = format!("lmk_{}", random_b64(32));
        let key = ApiKey {
            id: format!("key_{}", random_b64(6)),
            name: request.name,
            secret_sha256: secret_hash(&secret),
            created_at_ms: now_ms(),
            revoked: false,
            limits: Some(limits),
        };
        self.coordinator
            .propose(Command { kind: Some(command::Kind::CreateKey(key.clone())) })
            .await
            .map_err(to_status)?;
        Ok(Response::new(CreateKeyReply { key: Some(ApiKey { secret_sha256: Vec::new(), ..key }), secret }))
    }

    async fn list_keys(&self, request: Request<ListKeysRequest>) -> Result<Response<ListKeysReply>, Status> {
        self.authorize(&request)?;
        let state = self.coordinator.state();
        let keys = state.keys.values().map(|k| ApiKey { secret_sha256: Vec::new(), ..k.clone() }).collect();
        let usage = state.usage.values().cloned().collect();
        Ok(Response::new(ListKeysReply { keys, usage }))
    }

    async fn revoke_key(&self, request: Request<KeyRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        self.write(command::Kind::RevokeKey(RevokeKey { id })).await
    }

    async fn set_key_limits(&self, request: Request<KeyLimitsUpdate>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let update = request.into_inner();
        check_limits(update.limits.as_ref().unwrap_or(&KeyLimits::default()))?;
        self.write(command::Kind::SetKeyLimits(update)).await
    }

    async fn set_route(&self, request: Request<Route>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        self.write(command::Kind::SetRoute(request.into_inner())).await
    }

    async fn list_routes(&self, request: Request<ListRoutesRequest>) -> Result<Response<ListRoutesReply>, Status> {
        self.authorize(&request)?;
        let routes = self
            .coordinator
            .state()
            .routes
            .iter()
            .map(|(alias, model)| Route { alias: alias.clone(), model: model.clone() })
            .collect();
        Ok(Response::new(ListRoutesReply { routes }))
    }

    async fn remove_route(&self, request: Request<RouteRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        self.write(command::Kind::RemoveRoute(request.into_inner().alias)).await
    }

    async fn drain_node(&self, request: Request<NodeRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let member = self.member(&request.into_inner().node)?;
        self.write(command::Kind::SetDrained(SetDrained { node_id: member.node_id, drained: true })).await
    }

    async fn undrain_node(&self, request: Request<NodeRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let member = self.member(&request.into_inner().node)?;
        self.write(command::Kind::SetDrained(SetDrained { node_id: member.node_id, drained: false })).await
    }

    async fn remove_node(&self, request: Request<NodeRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let member = self.member(&request.into_inner().node)?;
        if member.raft_id == self.coordinator.status().leader {
            return Err(Status::failed_precondition(
                "that node is the Raft leader; stop it first (a new leader is elected), then remove it",
            ));
        }
        self.write(command::Kind::RemoveNode(member.node_id)).await
    }

    async fn set_bootstrap(
        &self,
        request: Request<llmesh_proto::BootstrapAddrs>,
    ) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let list = request.into_inner();
        for addr in &list.addrs {
            addr.parse::<libp2p::Multiaddr>()
                .map_err(|e| Status::invalid_argument(format!("'{addr}' is not a multiaddr: {e}")))?;
        }
        self.write(command::Kind::SetBootstrap(list)).await
    }

    async fn rotate_join_key(
        &self,
        request: Request<llmesh_proto::RotateJoinKeyRequest>,
    ) -> Result<Response<llmesh_proto::JoinKeyReply>, Status> {
        self.authorize(&request)?;
        let key: [u8; 32] = rand::random();
        let reply = self.write(command::Kind::SetJoinKey(key.to_vec())).await?.into_inner();
        Ok(Response::new(llmesh_proto::JoinKeyReply { join_key: key.to_vec(), index: reply.index }))
    }

    async fn revoke_node(&self, request: Request<NodeRef>) -> Result<Response<AdminReply>, Status> {
        self.authorize(&request)?;
        let node = request.into_inner().node;
        // A revoked node may be gone from the member list already; accept
        // its id as well as the name of a current member.
        let node_id = match self.member(&node) {
            Ok(member) => member.node_id,
            Err(_) if node.parse::<libp2p::PeerId>().is_ok() => node,
            Err(err) => return Err(err),
        };
        // Revoking the leader works too: every other node stops accepting
        // its messages at once, elects a new leader, which removes it.
        self.write(command::Kind::RevokeNode(node_id)).await
    }
}
