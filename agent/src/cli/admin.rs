//! `llmesh keys|route|node …`: operator commands over the Admin gRPC
//! service of any node. The node is named by its HTTP API URL (as for
//! `llmesh status`); its control port is looked up from `/mesh/v1/cluster`.
//!
//! The control plane admits members only (mutual TLS), so the CLI presents
//! the certificate of the node whose data directory it runs on, and the
//! admin token on top.

use std::process::ExitCode;

use llmesh_proto::admin_client::AdminClient;
use llmesh_proto::{
    ApiKey, CloudPolicy, CreateKeyRequest, KeyLimits, KeyLimitsUpdate, KeyRef, ListKeysRequest, ListRoutesRequest,
    NodeRef, Route, RouteRef,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use llmesh_mesh::pki::Trust;
use llmesh_mesh::pki::grpc::ChannelOptions;

use crate::cli::args::{AdminArgs, KeysCommand, LimitArgs, NodeCommand, RouteCommand, TokenCommand};
use llmesh::config::{MeshConfig, parse_peer_addr};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    /// The node's API or control port could not be reached.
    #[error("{0}")]
    Connect(String),
    /// No admin credential was given or found.
    #[error(
        "no admin token: pass --admin-token, set LLMESH_ADMIN_TOKEN, or run on the node that ran `llmesh init` (it keeps the token in {0})"
    )]
    NoToken(String),
    /// The node refused or failed the call.
    #[error("{}", .0.message())]
    Call(#[from] tonic::Status),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

/// The certificate of the node whose data directory the CLI runs on.
fn credentials(dir: &std::path::Path) -> Result<std::sync::Arc<Trust>, AdminCliError> {
    let no_cert = || {
        AdminCliError::Connect(format!(
            "{} holds no cluster certificate: run the CLI on a node of the cluster (with its --data-dir), since the control plane admits members only",
            dir.display()
        ))
    };
    let key = match llmesh_mesh::identity::load_existing(dir) {
        Ok(Some(key)) => key,
        Ok(None) => return Err(no_cert()),
        Err(err) => return Err(AdminCliError::Connect(err.to_string())),
    };
    let trust = Trust::load(dir, key, None).map_err(|e| AdminCliError::Connect(e.to_string()))?;
    if !trust.is_enrolled() {
        return Err(no_cert());
    }
    Ok(trust)
}

struct Admin {
    client: AdminClient<Channel>,
    token: String,
}

impl Admin {
    async fn connect(args: &AdminArgs) -> Result<Admin, AdminCliError> {
        let dir = MeshConfig { data_dir: args.data_dir.clone(), ..MeshConfig::default() }.data_dir();
        let trust = credentials(&dir)?;
        let token = match &args.admin_token {
            Some(token) => token.trim().to_string(),
            None => llmesh_mesh::seed::admin_token(&dir)
                .map_err(|e| AdminCliError::Connect(e.to_string()))?
                .ok_or_else(|| AdminCliError::NoToken(dir.join("admin.token").display().to_string()))?,
        };
        let control = match &args.control {
            Some(addr) => addr.to_string(),
            None => {
                let base = args.node.trim_end_matches('/');
                let cluster = crate::cli::status::fetch(&format!("{base}/mesh/v1/cluster"))
                    .await
                    .map_err(AdminCliError::Connect)?;
                let port = cluster["control_port"].as_u64().ok_or_else(|| {
                    AdminCliError::Connect(format!("{base} is not part of a mesh (it runs with --no-mesh?)"))
                })?;
                let uri: http::Uri =
                    base.parse().map_err(|e| AdminCliError::Usage(format!("bad --node URL {base}: {e}")))?;
                let host = uri.host().unwrap_or("127.0.0.1").trim_start_matches('[').trim_end_matches(']');
                let host = if host == "localhost" { "127.0.0.1" } else { host };
                if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
            }
        };
        let addr: std::net::SocketAddr = control
            .parse()
            .map_err(|e| AdminCliError::Usage(format!("bad control address {control} (want IP:PORT): {e}")))?;
        let options = ChannelOptions {
            connect_timeout: std::time::Duration::from_secs(5),
            timeout: std::time::Duration::from_secs(15),
        };
        let channel = llmesh_mesh::pki::grpc::channel(addr, &trust, options)
            .map_err(|e| AdminCliError::Connect(format!("control plane at {control}: {e}")))?;
        Ok(Admin { client: AdminClient::new(channel), token })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

fn cloud_policy(text: Option<&str>) -> Result<i32, AdminCliError> {
    let policy = match text {
        None => CloudPolicy::Unspecified,
        Some("never") => CloudPolicy::Never,
        Some("overflow") => CloudPolicy::Overflow,
        Some("failover") => CloudPolicy::Failover,
        Some("allowed") => CloudPolicy::Allowed,
        Some(other) => {
            return Err(AdminCliError::Usage(format!(
                "--cloud must be never, overflow, failover or allowed (got {other})"
            )));
        }
    };
    Ok(policy as i32)
}

fn limits(args: &LimitArgs) -> Result<KeyLimits, AdminCliError> {
    Ok(KeyLimits {
        requests_per_minute: args.rpm.unwrap_or(0),
        tokens_per_minute: args.tpm.unwrap_or(0),
        token_budget: args.budget.unwrap_or(0),
        budget_period: args.budget_period.clone().unwrap_or_default(),
        allowed_models: args.models.clone(),
        cloud: cloud_policy(args.cloud.as_deref())?,
        prefer_cloud_models: args.prefer_cloud.clone(),
    })
}

fn key_json(key: &ApiKey) -> Value {
    let limits = key.limits.clone().unwrap_or_default();
    let cloud = CloudPolicy::try_from(limits.cloud).map(|c| c.as_str_name()).unwrap_or("CLOUD_POLICY_UNSPECIFIED");
    json!({
        "id": key.id, "name": key.name, "revoked": key.revoked, "created_at_ms": key.created_at_ms,
        "limits": {
            "requests_per_minute": limits.requests_per_minute, "tokens_per_minute": limits.tokens_per_minute,
            "token_budget": limits.token_budget, "budget_period": limits.budget_period,
            "allowed_models": limits.allowed_models, "prefer_cloud_models": limits.prefer_cloud_models,
            "cloud": cloud.trim_start_matches("CLOUD_POLICY_").to_lowercase(),
        },
    })
}

fn or_dash(n: u64) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

fn print(json_out: bool, value: &Value, text: impl FnOnce() -> String) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        println!("{}", text());
    }
}

async fn keys(command: &KeysCommand, args: &AdminArgs) -> Result<(), AdminCliError> {
    let mut admin = Admin::connect(args).await?;
    match command {
        KeysCommand::Create { name, limits: l } => {
            let request = admin.request(CreateKeyRequest { name: name.clone(), limits: Some(limits(l)?) });
            let reply = admin.client.create_key(request).await?.into_inner();
            let key = reply.key.unwrap_or_default();
            let mut value = key_json(&key);
            value["secret"] = json!(reply.secret);
            print(args.json, &value, || {
                format!(
                    "created key {} ({})\nsecret: {}\n(shown once: clients send it as `Authorization: Bearer <secret>`)",
                    key.id, key.name, reply.secret
                )
            });
        }
        KeysCommand::List => {
            let reply = admin.client.list_keys(admin.request(ListKeysRequest {})).await?.into_inner();
            let (day, month) = llmesh::limits::periods(std::time::SystemTime::now());
            // Tokens used in the key's current period, from the ledger.
            let used = |key: &ApiKey| {
                let period = match key.limits.as_ref().map(|l| l.budget_period.as_str()) {
                    Some("day") => day.as_str(),
                    Some("month") => month.as_str(),
                    _ => "",
                };
                reply.usage.iter().find(|u| u.key_id == key.id && u.period == period).map_or(0, |u| u.tokens)
            };
            let value = json!({ "keys": reply.keys.iter().map(|k| {
                let mut v = key_json(k);
                v["tokens_used"] = json!(used(k));
                v
            }).collect::<Vec<_>>(), "ledger": reply.usage.iter().map(|u| json!({
                "key": u.key_id, "period": u.period, "tokens": u.tokens, "requests": u.requests,
            })).collect::<Vec<_>>() });
            print(args.json, &value, || {
                let mut lines = vec![format!(
                    "{:<14} {:<16} {:<8} {:>8} {:>10} {:>12} {:>10}  MODELS",
                    "ID", "NAME", "STATE", "REQ/MIN", "TOK/MIN", "BUDGET", "USED"
                )];
                for key in &reply.keys {
                    let l = key.limits.clone().unwrap_or_default();
                    let budget = if l.token_budget == 0 {
                        "-".to_string()
                    } else {
                        format!("{}/{}", l.token_budget, l.budget_period)
                    };
                    lines.push(format!(
                        "{:<14} {:<16} {:<8} {:>8} {:>10} {:>12} {:>10}  {}",
                        key.id,
                        key.name,
                        if key.revoked { "revoked" } else { "active" },
                        or_dash(l.requests_per_minute),
                        or_dash(l.tokens_per_minute),
                        budget,
                        used(key),
                        if l.allowed_models.is_empty() { "all".into() } else { l.allowed_models.join(",") }
                    ));
                }
                lines.join("\n")
            });
        }
        KeysCommand::Revoke { id } => {
            let reply = admin.client.revoke_key(admin.request(KeyRef { id: id.clone() })).await?.into_inner();
            print(args.json, &json!({ "index": reply.index, "message": reply.message }), || reply.message.clone());
        }
        KeysCommand::SetLimits { id, limits: l } => {
            let request = admin.request(KeyLimitsUpdate { id: id.clone(), limits: Some(limits(l)?) });
            let reply = admin.client.set_key_limits(request).await?.into_inner();
            print(args.json, &json!({ "index": reply.index, "message": reply.message }), || reply.message.clone());
        }
    }
    Ok(())
}

async fn route(command: &RouteCommand, args: &AdminArgs) -> Result<(), AdminCliError> {
    let mut admin = Admin::connect(args).await?;
    match command {
        RouteCommand::Set { alias, model } => {
            let request = admin.request(Route { alias: alias.clone(), model: model.clone() });
            let reply = admin.client.set_route(request).await?.into_inner();
            print(args.json, &json!({ "index": reply.index, "message": reply.message }), || reply.message.clone());
        }
        RouteCommand::List => {
            let reply = admin.client.list_routes(admin.request(ListRoutesRequest {})).await?.into_inner();
            let value: serde_json::Map<String, Value> =
                reply.routes.iter().map(|r| (r.alias.clone(), json!(r.model))).collect();
            print(args.json, &json!({ "routes": value }), || {
                if reply.routes.is_empty() {
                    return "no routes".into();
                }
                reply.routes.iter().map(|r| format!("{} → {}", r.alias, r.model)).collect::<Vec<_>>().join("\n")
            });
        }
        RouteCommand::Rm { alias } => {
            let reply = admin.client.remove_route(admin.request(RouteRef { alias: alias.clone() })).await?.into_inner();
            print(args.json, &json!({ "index": reply.index, "message": reply.message }), || reply.message.clone());
        }
    }
    Ok(())
}

async fn node(command: &NodeCommand, args: &AdminArgs) -> Result<(), AdminCliError> {
    let mut admin = Admin::connect(args).await?;
    let reply = match command {
        NodeCommand::Drain { target } => {
            admin.client.drain_node(admin.request(NodeRef { node: target.clone() })).await?
        }
        NodeCommand::Undrain { target } => {
            admin.client.undrain_node(admin.request(NodeRef { node: target.clone() })).await?
        }
        NodeCommand::Remove { target } => {
            admin.client.remove_node(admin.request(NodeRef { node: target.clone() })).await?
        }
        NodeCommand::Revoke { target } => {
            admin.client.revoke_node(admin.request(NodeRef { node: target.clone() })).await?
        }
    }
    .into_inner();
    print(args.json, &json!({ "index": reply.index, "message": reply.message }), || reply.message.clone());
    Ok(())
}

fn finish(what: &str, result: Result<(), AdminCliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llmesh {what}: {err}");
            match err {
                AdminCliError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `llmesh keys …`.
pub async fn run_keys(command: &KeysCommand, args: &AdminArgs) -> ExitCode {
    finish("keys", keys(command, args).await)
}

/// `llmesh route …`.
pub async fn run_route(command: &RouteCommand, args: &AdminArgs) -> ExitCode {
    finish("route", route(command, args).await)
}

/// `llmesh node …`.
pub async fn run_node(command: &NodeCommand, args: &AdminArgs) -> ExitCode {
    finish("node", node(command, args).await)
}

/// `llmesh token …`
pub async fn run_token(command: &TokenCommand, args: &AdminArgs) -> ExitCode {
    finish("token", token(command, args).await)
}

async fn token(command: &TokenCommand, args: &AdminArgs) -> Result<(), AdminCliError> {
    let dir = MeshConfig { data_dir: args.data_dir.clone(), ..MeshConfig::default() }.data_dir();
    let secret = llmesh_mesh::ClusterSecret::load(&dir)
        .map_err(|e| AdminCliError::Connect(e.to_string()))?
        .ok_or_else(|| AdminCliError::Connect(format!("{} holds no cluster secret", dir.display())))?;
    let ca = llmesh_mesh::pki::ca_fingerprint(&dir)
        .map_err(|e| AdminCliError::Connect(e.to_string()))?
        .ok_or_else(|| AdminCliError::Connect(format!("{} holds no cluster CA certificate", dir.display())))?;
    let mut admin = Admin::connect(args).await?;
    let (index, join, bootstrap, what) = match command {
        TokenCommand::Rotate => {
            let reply =
                admin.client.rotate_join_key(admin.request(llmesh_proto::RotateJoinKeyRequest {})).await?.into_inner();
            let join = <[u8; 32]>::try_from(reply.join_key.as_slice())
                .map_err(|_| AdminCliError::Connect("the node answered with a malformed join key".into()))?;
            // `llmesh init` on this directory prints the current token from now on.
            llmesh_mesh::seed::store_join_key(&dir, &join).map_err(|e| AdminCliError::Connect(e.to_string()))?;
            let bootstrap = llmesh_mesh::seed::bootstrap_addrs(&dir);
            (reply.index, join, bootstrap, "rotated the join key; earlier tokens no longer admit new nodes")
        }
        TokenCommand::Bootstrap { addrs } => {
            let parsed = addrs
                .iter()
                .map(|a| parse_peer_addr(a).map(|m| m.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| AdminCliError::Usage(e.to_string()))?;
            let request = admin.request(llmesh_proto::BootstrapAddrs { addrs: parsed.clone() });
            let reply = admin.client.set_bootstrap(request).await?.into_inner();
            llmesh_mesh::seed::store_bootstrap_addrs(&dir, &parsed)
                .map_err(|e| AdminCliError::Connect(e.to_string()))?;
            let join = llmesh_mesh::seed::join_key(&dir, &secret).map_err(|e| AdminCliError::Connect(e.to_string()))?;
            (reply.index, join, parsed, "join tokens carry these bootstrap addresses from now on")
        }
    };
    let bootstrap = bootstrap.iter().filter_map(|a| a.parse().ok()).collect();
    let token = llmesh_mesh::JoinToken { secret, ca, join, bootstrap }.encode();
    print(args.json, &json!({ "index": index, "token": token }), || format!("{what} (index {index})\n{token}"));
    Ok(())
}
