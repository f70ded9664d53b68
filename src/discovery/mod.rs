//! Discovery: which nodes a cluster has — from its static list, Kubernetes EndpointSlices and
//! Pods, or DNS — as a stream of member lists that the cluster (or any protocol) follows.
//!
//! [`start`] is the one entry point: it checks what can be checked at once (credentials,
//! RBAC, the shape of the configuration) and returns a [`Feed`]. The feed's `members` channel
//! holds `None` until the first complete view, then every distinct member list; its
//! `status` says whether the source is currently reachable. When a source becomes
//! unreachable the last member list stays in the channel: the cluster keeps routing to it.

pub mod dns;
pub mod kubernetes;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::common::metrics::{DiscoveryLabels, Metrics};
use crate::common::topology::Member;
use crate::config::Discovery;

/// Why discovery could not start. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cluster {cluster:?}: no Kubernetes configuration (set KUBECONFIG, provide ~/.kube/config, or run in a pod with a service account): {reason}")]
    KubeConfig { cluster: String, reason: String },
    #[error("cluster {cluster:?}: the Kubernetes API refused sluice's credentials ({status}): {message}. Check the token in the kubeconfig or the pod's service account")]
    Unauthorized {
        cluster: String,
        status: u16,
        message: String,
    },
    #[error("cluster {cluster:?}: RBAC denies sluice the `{verb}` verb on `{resource}` in namespace {namespace:?}: {message}. Grant get, list and watch on `pods` and on `endpointslices` (group discovery.k8s.io) in namespace {namespace:?} (see deploy/kubernetes/rbac.yaml)")]
    Forbidden {
        cluster: String,
        namespace: String,
        /// `list` or `watch`.
        verb: &'static str,
        /// `endpointslices` or `pods`.
        resource: &'static str,
        message: String,
    },
    #[error(
        "cluster {cluster:?}: the Kubernetes API rejected the {verb} of `{resource}` ({status}): {message}"
    )]
    Rejected {
        cluster: String,
        verb: &'static str,
        resource: &'static str,
        status: u16,
        message: String,
    },
    #[error("cluster {cluster:?}: DNS discovery: {reason}")]
    Dns { cluster: String, reason: String },
}

/// Whether a discovery source is reachable, for `/readyz`, `/topology` and the metrics.
pub struct Status {
    /// `"static"`, `"kubernetes"` or `"dns"`.
    pub source: &'static str,
    cluster: String,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    synced: bool,
    /// The last error, and since when the source has been failing.
    failing: Option<(String, Instant)>,
    /// When the failure was last logged at WARN.
    warned: Option<Instant>,
    /// What is wrong with the view the source gives (a Service with no EndpointSlice, a
    /// port the slices do not have), each naming the thing: empty when nothing is.
    problems: Vec<String>,
}

/// While a source keeps failing, a WARN line repeats it this often (once at first).
const REMIND_EVERY: Duration = Duration::from_secs(60);

impl Status {
    fn new(source: &'static str, cluster: &str, metrics: Arc<Metrics>) -> Status {
        let status = Status {
            source,
            cluster: cluster.to_string(),
            metrics,
            state: Mutex::default(),
        };
        status.gauge(0);
        status
    }

    fn labels(&self) -> DiscoveryLabels {
        DiscoveryLabels {
            cluster: self.cluster.clone(),
            source: self.source,
        }
    }

    fn gauge(&self, up: i64) {
        self.metrics.discovery_up.get_or_create(&self.labels()).set(up);
        // Exported at 0 from the start, so that the error rate is known before the first one.
        self.metrics.discovery_errors.get_or_create_owned(&self.labels());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source answered (a complete list, a watch event, or an accepted watch).
    pub fn ok(&self) {
        let recovered = {
            let mut s = self.lock();
            s.warned = None;
            s.failing.take()
        };
        if let Some((_, since)) = recovered {
            info!(cluster = %self.cluster, source = self.source, after = ?since.elapsed(), "discovery source reachable again");
        }
        self.gauge(1);
    }

    /// A complete view was published.
    fn synced(&self) {
        self.lock().synced = true;
        self.ok();
    }

    /// The source failed; the last member list stays in place. The first failure is logged
    /// at WARN, then a reminder every [`REMIND_EVERY`] while it lasts; retries in between
    /// only at DEBUG.
    pub fn failed(&self, error: &str) {
        let (first, remind) = {
            let mut s = self.lock();
            let now = Instant::now();
            let first = s.failing.is_none();
            match &mut s.failing {
                Some((e, _)) => *e = error.to_string(),
                None => s.failing = Some((error.to_string(), now)),
            }
            let remind = s.warned.is_none_or(|w| now.duration_since(w) >= REMIND_EVERY);
            if remind {
                s.warned = Some(now);
            }
            let since = s.failing.as_ref().map(|(_, t)| *t).unwrap_or(now);
            (first, remind.then(|| now.duration_since(since)))
        };
        self.metrics.discovery_errors.get_or_create(&self.labels()).inc();
        self.gauge(0);
        match remind {
            Some(_) if first => {
                warn!(cluster = %self.cluster, source = self.source, error, "discovery source failing; keeping the last known topology")
            }
            Some(for_) => {
                warn!(cluster = %self.cluster, source = self.source, error, failing_for = ?Duration::from_secs(for_.as_secs()), "discovery source still failing; keeping the last known topology")
            }
            None => {
                tracing::debug!(cluster = %self.cluster, source = self.source, error, "discovery source still failing")
            }
        }
    }

    /// Replaces the list of problems with the source's view; new ones are logged at WARN.
    pub(crate) fn set_problems(&self, problems: Vec<String>) {
        let (new, resolved): (Vec<String>, bool) = {
            let mut s = self.lock();
            if s.problems == problems {
                return;
            }
            let new = problems
                .iter()
                .filter(|p| !s.problems.contains(p))
                .cloned()
                .collect();
            let resolved = problems.is_empty();
            s.problems = problems;
            (new, resolved)
        };
        for problem in &new {
            warn!(cluster = %self.cluster, source = self.source, "discovery: {problem}");
        }
        if resolved {
            info!(cluster = %self.cluster, source = self.source, "discovery problems resolved");
        }
    }

    /// What is wrong with the source's view, each naming the thing (empty when nothing is).
    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    /// Whether a complete view has been published at least once.
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// The last error and how long the source has been failing, if it is.
    pub fn failing(&self) -> Option<(String, Duration)> {
        self.lock()
            .failing
            .as_ref()
            .map(|(e, since)| (e.clone(), since.elapsed()))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running discovery. Dropping it stops the source.
pub struct Feed {
    /// `None` until the first complete view; then the current members, sorted by id.
    pub members: watch::Receiver<Option<Vec<Member>>>,
    pub status: Arc<Status>,
    _task: Option<AbortOnDrop>,
}

// `synced` and `member_for_ip` are the API the CQL side maps its ring nodes with.
#[cfg_attr(not(test), allow(dead_code))]
impl Feed {
    /// Waits until the first complete view, up to `timeout`.
    pub async fn synced(&mut self, timeout: Duration) -> Option<Vec<Member>> {
        let got = tokio::time::timeout(timeout, self.members.wait_for(Option::is_some)).await;
        got.ok()?.ok()?.clone()
    }

    /// The current member whose address has this IP (e.g. a CQL ring node's broadcast
    /// address), to map it to its pod name and zone.
    pub fn member_for_ip(&self, ip: std::net::IpAddr) -> Option<Member> {
        let members = self.members.borrow();
        members
            .as_ref()?
            .iter()
            .find(|m| host_ip(&m.address) == Some(ip))
            .cloned()
    }
}

/// The IP of a `host:port` or `[v6]:port` address, if the host is an IP.
#[cfg_attr(not(test), allow(dead_code))]
fn host_ip(address: &str) -> Option<std::net::IpAddr> {
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    address.rsplit_once(':').and_then(|(h, _)| h.parse().ok())
}

/// Publishes member lists: sorts them, skips repeats, counts changes.
pub(crate) struct Publisher {
    tx: watch::Sender<Option<Vec<Member>>>,
    status: Arc<Status>,
}

impl Publisher {
    /// Publishes `members` if they differ from what is published.
    pub(crate) fn publish(&self, mut members: Vec<Member>) {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = self.tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&members) {
                false
            } else {
                *cur = Some(members.clone());
                true
            }
        });
        self.status.synced();
        if changed {
            let s = &self.status;
            s.metrics.discovery_updates.get_or_create(&s.labels()).inc();
            s.metrics
                .discovery_members
                .get_or_create(&s.labels())
                .set(members.len() as i64);
            info!(
                cluster = %s.cluster,
                source = s.source,
                members = %members
                    .iter()
                    .map(|m| match m.labeled_role {
                        Some(role) => format!("{}={} ({role:?})", m.id, m.address),
                        None => format!("{}={}", m.id, m.address),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                "discovered members"
            );
        }
    }
}

/// Starts discovery for a cluster named `cluster`. Static lists are published at once;
/// Kubernetes and DNS sources are checked (credentials, RBAC, a first lookup) before this
/// returns, so that a misconfiguration is a clear start-up error.
pub async fn start(cluster: &str, discovery: &Discovery, metrics: &Arc<Metrics>) -> Result<Feed, StartError> {
    let source = match discovery {
        Discovery::Static(_) => "static",
        Discovery::Kubernetes(_) => "kubernetes",
        Discovery::Dns(_) => "dns",
    };
    let (publisher, mut feed) = channel(source, cluster, metrics);
    let task = match discovery {
        Discovery::Static(addrs) => {
            publisher.publish(addrs.iter().map(|a| Member::at(a)).collect());
            None
        }
        Discovery::Kubernetes(k) => Some(kubernetes::start(cluster, k, publisher).await?),
        Discovery::Dns(d) => Some(dns::start(cluster, d, publisher).await?),
    };
    feed._task = task.map(AbortOnDrop);
    Ok(feed)
}

/// A publisher and the feed it publishes to (without a task yet).
fn channel(source: &'static str, cluster: &str, metrics: &Arc<Metrics>) -> (Publisher, Feed) {
    let status = Arc::new(Status::new(source, cluster, metrics.clone()));
    let (tx, rx) = watch::channel(None);
    let publisher = Publisher {
        tx,
        status: status.clone(),
    };
    let feed = Feed {
        members: rx,
        status,
        _task: None,
    };
    (publisher, feed)
}

/// Test access to a Kubernetes feed with a given client.
#[cfg(test)]
pub(crate) async fn kubernetes_feed(
    cfg: &crate::config::KubernetesDiscovery,
    client: kube::Client,
    metrics: &Arc<Metrics>,
) -> Result<Feed, StartError> {
    let (publisher, mut feed) = channel("kubernetes", "test", metrics);
    feed._task = Some(AbortOnDrop(
        kubernetes::start_with_client("test", cfg, client, publisher).await?,
    ));
    Ok(feed)
}

/// Test access to a DNS feed.
#[cfg(test)]
pub(crate) async fn dns_feed(
    cfg: &crate::config::DnsDiscovery,
    metrics: &Arc<Metrics>,
) -> Result<Feed, StartError> {
    let (publisher, mut feed) = channel("dns", "test", metrics);
    feed._task = Some(AbortOnDrop(dns::start("test", cfg, publisher).await?));
    Ok(feed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_lists_publish_at_once_and_map_ips_to_members() {
        let metrics = Arc::new(Metrics::new());
        let d = Discovery::Static(vec!["127.0.0.1:5432".into(), "[::1]:5433".into()]);
        let mut feed = start("app", &d, &metrics).await.unwrap();
        let members = feed.synced(Duration::from_secs(1)).await.unwrap();
        assert_eq!(members.len(), 2);
        assert!(feed.status.is_synced() && feed.status.failing().is_none());
        let m = feed.member_for_ip("::1".parse().unwrap()).unwrap();
        assert_eq!(m.address, "[::1]:5433");
        assert!(feed.member_for_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(metrics
            .encode()
            .contains("sluice_discovery_up{cluster=\"app\",source=\"static\"} 1"));
    }
}
