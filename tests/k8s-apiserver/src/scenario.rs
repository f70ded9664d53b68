//! Recorded scenarios: the objects of a LIST and the events of the WATCHes that followed it,
//! read from `../shared/fixtures/k8s/` (kube-apiserver v1.36 recordings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

/// The resources the fake server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    EndpointSlice,
    Pod,
}

impl Kind {
    /// The `kind` of one object.
    pub fn name(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }

    /// `apiVersion` of the objects and their lists.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Pod => "v1",
        }
    }

    /// The plural resource name in URLs and RBAC rules.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "endpointslices",
            Kind::Pod => "pods",
        }
    }

    /// The API group ("" for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Pod => "",
        }
    }

    /// `resource.group` as error messages name it (`pods`, `endpointslices.discovery.k8s.io`).
    pub fn qualified_resource(self) -> String {
        match self.group() {
            "" => self.resource().to_string(),
            group => format!("{}.{group}", self.resource()),
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        match name {
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Pod" => Some(Kind::Pod),
            _ => None,
        }
    }

    /// The stub object of a BOOKMARK event, exactly as kube-apiserver v1.36 writes it.
    pub fn bookmark_object(self, rv: u64, initial_events_end: bool) -> String {
        let annotations = if initial_events_end {
            r#","annotations":{"k8s.io/initial-events-end":"true"}"#
        } else {
            ""
        };
        let rest = match self {
            Kind::EndpointSlice => r#","addressType":"","endpoints":null,"ports":null"#,
            Kind::Pod => r#","spec":{"containers":null},"status":{}"#,
        };
        format!(
            r#"{{"kind":"{}","apiVersion":"{}","metadata":{{"resourceVersion":"{rv}"{annotations}}}{rest}}}"#,
            self.name(),
            self.api_version()
        )
    }
}

/// What a watch event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// The `type` field of a watch event.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One stored object. `text` is the exact JSON of the object as a watch event carries it
/// (with `kind` and `apiVersion`); LIST items are the same text without those two fields.
#[derive(Debug, Clone)]
pub struct Object {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub rv: u64,
    pub labels: BTreeMap<String, String>,
    pub text: String,
}

impl Object {
    /// Reads an object in watch form (`{"kind":…,"apiVersion":…,"metadata":…}`).
    pub fn from_watch_text(text: &str) -> Result<Object, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("bad object JSON: {e}"))?;
        let kind = v["kind"]
            .as_str()
            .and_then(Kind::from_name)
            .ok_or_else(|| format!("unsupported kind {}", v["kind"]))?;
        let meta = &v["metadata"];
        let rv = meta["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("object without a numeric resourceVersion")?;
        let labels = meta["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Object {
            kind,
            namespace: meta["namespace"].as_str().unwrap_or_default().to_string(),
            name: meta["name"].as_str().unwrap_or_default().to_string(),
            rv,
            labels,
            text: text.to_string(),
        })
    }

    /// Reads a LIST item (no `kind`/`apiVersion`) of `kind`.
    pub fn from_list_item(kind: Kind, text: &str) -> Result<Object, String> {
        let rest = text.strip_prefix('{').ok_or("list item is not an object")?;
        Object::from_watch_text(&format!(
            r#"{{"kind":"{}","apiVersion":"{}",{rest}"#,
            kind.name(),
            kind.api_version()
        ))
    }

    /// The object as a LIST item: the watch text without `kind` and `apiVersion`.
    pub fn list_text(&self) -> String {
        let head = format!(
            r#"{{"kind":"{}","apiVersion":"{}","#,
            self.kind.name(),
            self.kind.api_version()
        );
        match self.text.strip_prefix(&head) {
            Some(rest) => format!("{{{rest}"),
            None => self.text.clone(),
        }
    }
}

/// One recorded change, in resourceVersion order.
#[derive(Debug, Clone)]
pub enum Step {
    /// An object was written (or deleted) at `object.rv`.
    Write { event: EventType, object: Object },
    /// The server sent a periodic BOOKMARK at `rv` to watches of `kind`.
    Bookmark { kind: Kind, rv: u64 },
}

impl Step {
    /// The resourceVersion of the step.
    pub fn rv(&self) -> u64 {
        match self {
            Step::Write { object, .. } => object.rv,
            Step::Bookmark { rv, .. } => *rv,
        }
    }
}

/// The starting objects of a scenario and the recorded steps that follow.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The resourceVersion of the starting LISTs.
    pub rv: u64,
    pub objects: Vec<Object>,
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
struct ListBody<'a> {
    kind: String,
    metadata: ListMeta,
    #[serde(borrow)]
    items: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Deserialize)]
struct WatchLine<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow)]
    object: &'a RawValue,
}

/// Where the recordings are: `$SLUICE_K8S_FIXTURES`, else `../shared/fixtures/k8s` beside the
/// workspace.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SLUICE_K8S_FIXTURES") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/k8s")
}

/// The bytes of one recorded file, e.g. `("cnpg-failover", "01-list-endpointslices.body.json")`.
pub fn recording(scenario: &str, file: &str) -> Vec<u8> {
    let path = fixtures_dir().join(scenario).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read recording {}: {e}", path.display()))
}

/// One recorded `*.exchange.json`, parsed.
pub fn exchange(scenario: &str, file: &str) -> serde_json::Value {
    serde_json::from_slice(&recording(scenario, file))
        .unwrap_or_else(|e| panic!("bad exchange {scenario}/{file}: {e}"))
}

/// Parses the events of a recorded watch stream: (type, object text) per line.
pub fn watch_events(stream: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(stream).expect("watch streams are UTF-8");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let line: WatchLine<'_> =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad watch line {l}: {e}"));
            (line.kind, line.object.get().to_string())
        })
        .collect()
}

impl Scenario {
    /// Loads a scenario from `fixtures_dir()/name`: the LIST bodies `lists` give the starting
    /// objects (they must share one resourceVersion), and the watch streams `watches` (started
    /// at that resourceVersion) give the steps.
    pub fn load(name: &str, lists: &[&str], watches: &[&str]) -> Scenario {
        let mut objects = Vec::new();
        let mut rv = None;
        for file in lists {
            let bytes = recording(name, file);
            let list: ListBody<'_> =
                serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("bad list {name}/{file}: {e}"));
            let kind = Kind::from_name(list.kind.trim_end_matches("List"))
                .unwrap_or_else(|| panic!("{name}/{file}: unsupported list kind {}", list.kind));
            let list_rv: u64 = list.metadata.resource_version.parse().expect("numeric list RV");
            match rv {
                None => rv = Some(list_rv),
                Some(r) => assert_eq!(
                    r, list_rv,
                    "{name}: the starting LISTs must share one resourceVersion"
                ),
            }
            for item in list.items {
                objects.push(Object::from_list_item(kind, item.get()).expect("valid list item"));
            }
        }
        let mut steps = Vec::new();
        for file in watches {
            for (kind, object) in watch_events(&recording(name, file)) {
                let step = match kind.as_str() {
                    "ADDED" | "MODIFIED" | "DELETED" => Step::Write {
                        event: match kind.as_str() {
                            "ADDED" => EventType::Added,
                            "MODIFIED" => EventType::Modified,
                            _ => EventType::Deleted,
                        },
                        object: Object::from_watch_text(&object).expect("valid watch object"),
                    },
                    "BOOKMARK" => {
                        let o: serde_json::Value = serde_json::from_str(&object).expect("bookmark JSON");
                        Step::Bookmark {
                            kind: Kind::from_name(o["kind"].as_str().unwrap_or_default())
                                .expect("bookmark kind"),
                            rv: o["metadata"]["resourceVersion"]
                                .as_str()
                                .and_then(|s| s.parse().ok())
                                .expect("bookmark RV"),
                        }
                    }
                    other => panic!("{name}/{file}: unexpected event type {other} in a scenario"),
                };
                steps.push(step);
            }
        }
        // Writes keep their order; a bookmark sorts after the writes of its resourceVersion.
        steps.sort_by_key(|s| (s.rv(), matches!(s, Step::Bookmark { .. })));
        Scenario {
            rv: rv.unwrap_or(0),
            objects,
            steps,
        }
    }

    /// CloudNativePG failover pg-1 → pg-2: LISTs at RV 244, then the watches until RV 274.
    pub fn cnpg_failover() -> Scenario {
        Scenario::load(
            "cnpg-failover",
            &["01-list-endpointslices.body.json", "02-list-pods.body.json"],
            &[
                "03-watch-endpointslices.stream.jsonl",
                "04-watch-pods.stream.jsonl",
            ],
        )
    }

    /// Patroni/Spilo switchover acid-pg-0 → acid-pg-1: LISTs at RV 319, then the switchover.
    pub fn patroni_switchover() -> Scenario {
        Scenario::load(
            "patroni-switchover",
            &["05-list-endpointslices.body.json", "06-list-pods.body.json"],
            &[
                "07-watch-endpointslices.stream.jsonl",
                "08-watch-pods.stream.jsonl",
            ],
        )
    }

    /// Patroni from an empty namespace through bootstrap and the switchover.
    pub fn patroni_bootstrap() -> Scenario {
        Scenario::load(
            "patroni-switchover",
            &[
                "01-list-endpointslices-empty.body.json",
                "02-list-pods-empty.body.json",
            ],
            &[
                "03-watch-endpointslices-from-bootstrap.stream.jsonl",
                "04-watch-pods-from-bootstrap.stream.jsonl",
            ],
        )
    }

    /// Cassandra StatefulSet: scale to 4, cass-1 restarted with a new IP, scale back to 3.
    pub fn cassandra_ring() -> Scenario {
        Scenario::load(
            "cassandra-ring",
            &["01-list-endpointslices.body.json", "02-list-pods.body.json"],
            &[
                "03-watch-endpointslices.stream.jsonl",
                "04-watch-pods.stream.jsonl",
            ],
        )
    }

    /// Replaces `from` with `to` in every object (e.g. `"\"10.244.1.11\""` →
    /// `"\"127.0.0.2\""`, or `"\"port\":5432"` → `"\"port\":41234"`), so that tests never
    /// send traffic to the recorded addresses.
    pub fn rewrite(mut self, from: &str, to: &str) -> Scenario {
        let fix = |o: &mut Object| {
            if o.text.contains(from) {
                *o =
                    Object::from_watch_text(&o.text.replace(from, to)).expect("rewritten object stays valid");
            }
        };
        self.objects.iter_mut().for_each(fix);
        for s in &mut self.steps {
            if let Step::Write { object, .. } = s {
                fix(object);
            }
        }
        self
    }

    /// The resourceVersions of the recorded writes of `kind` to the object `name`, in order.
    pub fn rvs_of(&self, kind: Kind, name: &str) -> Vec<u64> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Write { object, .. } if object.kind == kind && object.name == name => Some(object.rv),
                _ => None,
            })
            .collect()
    }
}
