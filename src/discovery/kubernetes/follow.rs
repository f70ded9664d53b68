//! Following a Kubernetes source: kube's watchers on the EndpointSlices and the Pods, and the
//! health of the source. The source is failing from its first error until a complete list, a
//! watch event or an accepted probe watch shows that the API server answers again; retries
//! back off to tens of seconds; and when the watches have been quiet for a while, a probe
//! checks that the API server still answers (a hung one keeps its connections open and says
//! nothing, which a watch cannot tell from a quiet cluster).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchParams};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::runtime::WatchStreamExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::debug;

use super::{diagnose, map_event, members, role_rules, slice_selector, Mirror};
use crate::config::KubernetesDiscovery;
use crate::discovery::Publisher;

/// How long the API server keeps one watch open (`timeoutSeconds`) before kube resumes it
/// from the last resourceVersion. kube's watcher treats this plus 5 s without a byte as a
/// dead connection and reconnects, so a silently dropped watch is replaced within 30 s.
pub const WATCH_TIMEOUT_SECS: u32 = 25;
/// With no watch event for this long, a probe checks that the API server still answers.
pub const QUIET_PROBE_AFTER: Duration = Duration::from_secs(15);
/// A probe that gets no answer in this time means the API server hangs.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// While the source is failing, probes start 1 s apart and back off to this.
const PROBE_RETRY_MAX: Duration = Duration::from_secs(30);

/// kube's default watcher backoff (client-go's: 0.8 s doubling to 30 s, with jitter), reset
/// only after real progress. kube resets the backoff after every successful item, and a
/// watcher whose list failed yields a successful `Init` before it lists again, so without
/// this the backoff never grows during an outage: a retry every 0.8 s.
struct Retry {
    inner: DefaultBackoff,
    progress: Arc<AtomicBool>,
}

impl Retry {
    fn new(progress: Arc<AtomicBool>) -> Retry {
        Retry {
            inner: DefaultBackoff::default(),
            progress,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.progress.swap(false, Ordering::AcqRel) {
            self.inner.reset();
        }
        self.inner.next()
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {}
}

/// Which verb of a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    List,
    Watch,
}

/// Lists one object of `api` (with `selector`) and starts a one-second watch from the list's
/// resourceVersion, as the watcher would: the API server answers both and RBAC allows both.
/// Only the answer to the watch request is waited for; its stream is dropped.
pub async fn probe<K>(api: &Api<K>, selector: Option<&str>) -> Result<(), (Verb, kube::Error)>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let mut lp = ListParams::default().limit(1);
    let mut wp = WatchParams::default().timeout(1);
    if let Some(sel) = selector {
        lp = lp.labels(sel);
        wp = wp.labels(sel);
    }
    let list = api.list_metadata(&lp).await.map_err(|e| (Verb::List, e))?;
    let rv = list.metadata.resource_version.unwrap_or_else(|| "0".into());
    api.watch_metadata(&wp, &rv)
        .await
        .map(drop)
        .map_err(|e| (Verb::Watch, e))
}

/// Why a probe failed, in words.
fn describe(e: &(Verb, kube::Error)) -> String {
    let verb = match e.0 {
        Verb::List => "list",
        Verb::Watch => "watch",
    };
    format!("{verb}: {}", e.1)
}

enum Update {
    Slices(Event<(String, Box<EndpointSlice>)>),
    Pods(Event<(String, BTreeMap<String, String>)>),
}

impl Update {
    /// Whether the event shows the API server answering: a complete list or a watch event.
    fn is_progress(&self) -> bool {
        fn progress<T>(e: &Event<T>) -> bool {
            matches!(e, Event::InitDone | Event::Apply(_) | Event::Delete(_))
        }
        match self {
            Update::Slices(e) => progress(e),
            Update::Pods(e) => progress(e),
        }
    }
}

/// Whether a watcher error is the routine `410 Expired` (etcd compacted the watch's
/// resourceVersion): the watcher lists again, nothing failed.
fn is_expired(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

/// Follows the source until the task is aborted.
pub(super) async fn run(
    cluster: String,
    cfg: KubernetesDiscovery,
    slices: Api<EndpointSlice>,
    pods: Api<Pod>,
    publisher: Publisher,
) {
    let slice_sel = slice_selector(&cfg.services);
    let pod_sel = cfg.pod_selector.clone();
    let slice_progress = Arc::new(AtomicBool::new(false));
    let pod_progress = Arc::new(AtomicBool::new(false));
    let config = |sel: Option<&str>| {
        let c = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
        match sel {
            Some(s) => c.labels(s),
            None => c,
        }
    };
    let slice_events = watcher::watcher(slices.clone(), config(Some(&slice_sel)))
        .backoff(Retry::new(slice_progress.clone()))
        .map(|r| {
            r.map(|e| {
                Update::Slices(map_event(e, |s: EndpointSlice| {
                    (s.metadata.name.clone().unwrap_or_default(), Box::new(s))
                }))
            })
        });
    let pod_events = watcher::watcher(pods.clone(), config(pod_sel.as_deref()))
        .backoff(Retry::new(pod_progress.clone()))
        .map(|r| {
            r.map(|e| {
                // Only names and labels are kept: a namespace's Pods can be many and large.
                Update::Pods(map_event(e, |p: Pod| {
                    (
                        p.metadata.name.unwrap_or_default(),
                        p.metadata.labels.unwrap_or_default(),
                    )
                }))
            })
        });
    let rules = role_rules(&cfg.roles);
    let mut events = std::pin::pin!(futures_util::stream::select(slice_events, pod_events));
    let mut slice_view: Mirror<Box<EndpointSlice>> = Mirror::default();
    let mut pod_view: Mirror<BTreeMap<String, String>> = Mirror::default();
    let status = publisher.status.clone();
    // When the API server last answered, and the wait before the next probe while failing.
    let mut last_answer = Instant::now();
    let mut retry_wait = Duration::from_secs(1);
    let mut next_probe = last_answer + QUIET_PROBE_AFTER;
    loop {
        tokio::select! {
            next = events.next() => {
                let update = match next {
                    None => return,
                    Some(Err(e)) if is_expired(&e) => {
                        debug!(cluster = %cluster, error = %e, "watch expired (410); kube lists again");
                        continue;
                    }
                    Some(Err(e)) => {
                        status.failed(&e.to_string());
                        if status.failing().is_some() && next_probe > Instant::now() + retry_wait {
                            next_probe = Instant::now() + retry_wait;
                        }
                        continue;
                    }
                    Some(Ok(update)) => update,
                };
                if !matches!(update, Update::Slices(Event::Init) | Update::Pods(Event::Init)) {
                    last_answer = Instant::now();
                    if status.failing().is_none() {
                        next_probe = last_answer + QUIET_PROBE_AFTER;
                    }
                }
                if update.is_progress() {
                    match &update {
                        Update::Slices(_) => slice_progress.store(true, Ordering::Release),
                        Update::Pods(_) => pod_progress.store(true, Ordering::Release),
                    }
                    status.ok();
                    retry_wait = Duration::from_secs(1);
                    next_probe = last_answer + QUIET_PROBE_AFTER;
                }
                let changed = match update {
                    Update::Slices(e) => slice_view.apply(e),
                    Update::Pods(e) => pod_view.apply(e),
                };
                if changed && slice_view.synced && pod_view.synced {
                    let all = slice_view.items.values().map(|s| &**s);
                    // Problems first: whoever waits for the members finds them said.
                    status.set_problems(diagnose::problems(&cfg, all.clone()));
                    publisher.publish(members(all, &pod_view.items, &cfg.port, &rules));
                }
            }
            _ = tokio::time::sleep_until(next_probe) => {
                let checks = async {
                    probe(&slices, Some(&slice_sel)).await?;
                    probe(&pods, pod_sel.as_deref()).await
                };
                match tokio::time::timeout(PROBE_TIMEOUT, checks).await {
                    Ok(Ok(())) => {
                        last_answer = Instant::now();
                        status.ok();
                        retry_wait = Duration::from_secs(1);
                        next_probe = last_answer + QUIET_PROBE_AFTER;
                    }
                    outcome => {
                        let error = match outcome {
                            Ok(Err(e)) => describe(&e),
                            _ => format!(
                                "the Kubernetes API server did not answer within {PROBE_TIMEOUT:?} (last answer {:?} ago); it may be hung",
                                Duration::from_secs(last_answer.elapsed().as_secs())
                            ),
                        };
                        status.failed(&error);
                        next_probe = Instant::now() + retry_wait;
                        retry_wait = (retry_wait * 2).min(PROBE_RETRY_MAX);
                    }
                }
            }
        }
    }
}
