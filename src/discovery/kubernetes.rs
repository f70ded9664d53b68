//! Kubernetes discovery: the EndpointSlices of one or more Services and the Pods of their
//! namespace, followed with kube's runtime watcher (list, then watch from the list's
//! resourceVersion; resume after disconnects; re-list after `410 Expired`).
//!
//! Endpoint conditions decide who is a member: ready endpoints (not terminating) serve; when
//! none is ready, endpoints that are still serving (terminating ones, during a rollout) do.
//! A member's id is its pod name, so a pod that restarts with a new IP stays the same node.
//! Pod labels only say what a node is supposed to be (`labeled_role`): the probes decide.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::Event;
use tokio::task::JoinHandle;

use super::{Publisher, StartError};
use crate::common::topology::{Member, Role};
use crate::config::{KubernetesDiscovery, PortRef, RoleLabels};

/// How long the start-up checks may take before sluice starts anyway and keeps retrying.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// One role label and the values that mean primary and replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRule {
    pub label: String,
    pub primary: Vec<String>,
    pub replica: Vec<String>,
}

/// The labels a preset (or a custom table) reads, first match wins.
pub fn role_rules(roles: &RoleLabels) -> Vec<RoleRule> {
    let rule = |label: &str, primary: &[&str], replica: &[&str]| RoleRule {
        label: label.to_string(),
        primary: primary.iter().map(|s| s.to_string()).collect(),
        replica: replica.iter().map(|s| s.to_string()).collect(),
    };
    match roles {
        RoleLabels::Preset(p) if p == "cloudnative-pg" => vec![
            rule("cnpg.io/instanceRole", &["primary"], &["replica"]),
            rule("role", &["primary"], &["replica"]),
        ],
        RoleLabels::Preset(p) if p == "patroni" => vec![
            rule(
                "spilo-role",
                &["master", "primary"],
                &["replica", "standby-leader", "standby_leader"],
            ),
            rule(
                "role",
                &["master", "primary"],
                &["replica", "standby-leader", "standby_leader"],
            ),
        ],
        RoleLabels::Preset(p) if p == "crunchy" => vec![rule(
            "postgres-operator.crunchydata.com/role",
            &["master", "primary"],
            &["replica"],
        )],
        RoleLabels::Preset(other) => unreachable!("config validation admits no preset {other:?}"),
        RoleLabels::Custom {
            label,
            primary,
            replica,
        } => vec![rule(label, &[primary], &[replica])],
    }
}

/// What the labels of a pod claim it is.
pub fn labeled_role(rules: &[RoleRule], labels: &BTreeMap<String, String>) -> Option<Role> {
    rules.iter().find_map(|r| {
        let v = labels.get(&r.label)?;
        if r.primary.contains(v) {
            Some(Role::Primary)
        } else if r.replica.contains(v) {
            Some(Role::Replica)
        } else {
            None
        }
    })
}

/// The label selector for the EndpointSlices of `services`.
pub fn slice_selector(services: &[String]) -> String {
    match services {
        [one] => format!("kubernetes.io/service-name={one}"),
        many => format!("kubernetes.io/service-name in ({})", many.join(",")),
    }
}

/// `host:port`, with brackets around IPv6 hosts.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The port of `slice` that `want` names; a number matches a listed port or stands alone
/// when the slice lists none.
fn slice_port(slice: &EndpointSlice, want: &PortRef) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let found = match want {
        PortRef::Name(n) => ports.iter().find(|p| p.name.as_deref() == Some(n.as_str()))?.port,
        PortRef::Number(n) if ports.is_empty() => return Some(*n),
        PortRef::Number(n) => ports.iter().find(|p| p.port == Some(i32::from(*n)))?.port,
    };
    found.and_then(|p| u16::try_from(p).ok())
}

struct Candidate {
    member: Member,
    ready: bool,
    serving: bool,
}

/// The members that `slices` and the pods' labels describe: ready endpoints, or serving
/// ones when none is ready; one member per pod.
pub fn members<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: &BTreeMap<String, BTreeMap<String, String>>,
    port: &PortRef,
    rules: &[RoleRule],
) -> Vec<Member> {
    let mut by_id: BTreeMap<String, Candidate> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice_port(slice, port) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            let id = pod
                .clone()
                .or_else(|| ep.hostname.clone())
                .unwrap_or_else(|| addr.clone());
            let cond = ep.conditions.clone().unwrap_or_default();
            // Unset conditions: ready means ready, serving follows ready (mirrored slices
            // carry only `ready`).
            let ready = cond.ready.unwrap_or(true);
            let terminating = cond.terminating.unwrap_or(false);
            let serving = cond.serving.unwrap_or(ready);
            let candidate = Candidate {
                member: Member {
                    id: id.clone(),
                    address: join_host_port(addr, port),
                    zone: ep.zone.clone(),
                    node: ep.node_name.clone(),
                    labeled_role: pod
                        .and_then(|p| pods.get(&p))
                        .and_then(|l| labeled_role(rules, l)),
                },
                ready: ready && !terminating,
                serving,
            };
            // The same pod in two slices: the ready entry wins, else the first seen.
            match by_id.get(&id) {
                Some(old) if old.ready || !candidate.ready => {}
                _ => {
                    by_id.insert(id, candidate);
                }
            }
        }
    }
    let any_ready = by_id.values().any(|c| c.ready);
    by_id
        .into_values()
        .filter(|c| if any_ready { c.ready } else { c.serving })
        .map(|c| c.member)
        .collect()
}

/// Objects of one kind as the watcher delivers them, with a buffer for re-lists so that the
/// current view stays whole until the new list is complete.
struct Mirror<T> {
    items: BTreeMap<String, T>,
    relisting: Option<BTreeMap<String, T>>,
    synced: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Mirror {
            items: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T> Mirror<T> {
    /// Applies one event; returns whether the complete view changed.
    fn apply(&mut self, event: Event<(String, T)>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply((k, v)) => {
                self.relisting.get_or_insert_with(BTreeMap::new).insert(k, v);
                false
            }
            Event::InitDone => {
                self.items = self.relisting.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply((k, v)) => {
                self.items.insert(k, v);
                true
            }
            Event::Delete((k, _)) => self.items.remove(&k).is_some(),
        }
    }
}

fn map_event<K, T>(event: Event<K>, f: impl Fn(K) -> (String, T)) -> Event<(String, T)> {
    match event {
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(k)),
        Event::InitDone => Event::InitDone,
        Event::Apply(k) => Event::Apply(f(k)),
        Event::Delete(k) => Event::Delete(f(k)),
    }
}

/// The HTTP status and message of an API error, if it is one.
fn api_status(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.message.clone())),
        _ => None,
    }
}

/// One LIST (with `limit=1`) and one WATCH of each resource, as the watchers will make them:
/// credentials and RBAC problems (a missing `list` or `watch` verb) become start-up errors;
/// an unreachable API server only a warning (the watchers keep trying).
async fn preflight(
    cluster: &str,
    cfg: &KubernetesDiscovery,
    slices: &Api<EndpointSlice>,
    pods: &Api<Pod>,
    slice_sel: &str,
) -> Result<(), StartError> {
    let checks = async {
        [
            ("endpointslices", follow::probe(slices, Some(slice_sel)).await),
            ("pods", follow::probe(pods, cfg.pod_selector.as_deref()).await),
        ]
    };
    let results = match tokio::time::timeout(PREFLIGHT_TIMEOUT, checks).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(cluster, "the Kubernetes API did not answer within {PREFLIGHT_TIMEOUT:?}; starting anyway and retrying");
            return Ok(());
        }
    };
    for (resource, result) in results {
        let Err((verb, e)) = result else { continue };
        let verb = match verb {
            follow::Verb::List => "list",
            follow::Verb::Watch => "watch",
        };
        match api_status(&e) {
            Some((401, message)) => {
                return Err(StartError::Unauthorized {
                    cluster: cluster.into(),
                    status: 401,
                    message,
                })
            }
            Some((403, message)) => {
                return Err(StartError::Forbidden {
                    cluster: cluster.into(),
                    namespace: cfg.namespace.clone(),
                    verb,
                    resource,
                    message,
                })
            }
            Some((status @ (400 | 404), message)) => {
                return Err(StartError::Rejected {
                    cluster: cluster.into(),
                    verb,
                    resource,
                    status,
                    message,
                })
            }
            _ => {
                tracing::warn!(cluster, error = %e, "the Kubernetes API is not reachable yet; starting anyway and retrying");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Connects to the API server (KUBECONFIG, ~/.kube/config or in-cluster), checks access,
/// and starts following the Service's EndpointSlices and the namespace's Pods.
pub(super) async fn start(
    cluster: &str,
    cfg: &KubernetesDiscovery,
    publisher: Publisher,
) -> Result<JoinHandle<()>, StartError> {
    let config = kube::Config::infer().await.map_err(|e| StartError::KubeConfig {
        cluster: cluster.into(),
        reason: e.to_string(),
    })?;
    let client = kube::Client::try_from(config).map_err(|e| StartError::KubeConfig {
        cluster: cluster.into(),
        reason: e.to_string(),
    })?;
    start_with_client(cluster, cfg, client, publisher).await
}

/// [`start`] with a given client.
pub(super) async fn start_with_client(
    cluster: &str,
    cfg: &KubernetesDiscovery,
    client: kube::Client,
    publisher: Publisher,
) -> Result<JoinHandle<()>, StartError> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &cfg.namespace);
    let pods: Api<Pod> = Api::namespaced(client, &cfg.namespace);
    let slice_sel = slice_selector(&cfg.services);
    preflight(cluster, cfg, &slices, &pods, &slice_sel).await?;
    Ok(tokio::spawn(follow::run(
        cluster.to_string(),
        cfg.clone(),
        slices,
        pods,
        publisher,
    )))
}

mod diagnose;
mod follow;

#[cfg(test)]
mod tests;
