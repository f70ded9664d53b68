//! The fake server's storage: current objects, the event log watches read from, compaction.

use std::collections::{BTreeMap, VecDeque};

use crate::scenario::{EventType, Kind, Object, Scenario, Step};
use crate::selector::Selector;

/// One entry of the event log.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Write {
        event: EventType,
        object: Object,
        /// The labels before this write, to turn label changes into ADDED/DELETED for
        /// watches whose selector the object enters or leaves.
        before: Option<BTreeMap<String, String>>,
    },
    Bookmark {
        kind: Kind,
        rv: u64,
    },
}

impl Entry {
    pub(crate) fn rv(&self) -> u64 {
        match self {
            Entry::Write { object, .. } => object.rv,
            Entry::Bookmark { rv, .. } => *rv,
        }
    }
}

/// One line a watch sends.
pub(crate) fn event_line(event: &str, object: &str) -> String {
    format!("{{\"type\":\"{event}\",\"object\":{object}}}\n")
}

/// Everything the fake API server knows.
pub(crate) struct Store {
    /// The latest resourceVersion.
    pub rv: u64,
    objects: BTreeMap<(Kind, String, String), Object>,
    log: Vec<Entry>,
    pending: VecDeque<Step>,
    /// Watches from a resourceVersion below this get `410 Expired`.
    pub compacted: u64,
}

impl Store {
    pub fn new(scenario: Scenario) -> Store {
        let objects = scenario
            .objects
            .into_iter()
            .map(|o| ((o.kind, o.namespace.clone(), o.name.clone()), o))
            .collect();
        Store {
            rv: scenario.rv,
            objects,
            log: Vec::new(),
            pending: scenario.steps.into(),
            compacted: 0,
        }
    }

    /// The resourceVersion of the next recorded step, if any is left.
    pub fn next_rv(&self) -> Option<u64> {
        self.pending.front().map(Step::rv)
    }

    /// Applies the recorded steps up to and including `rv`; returns how many.
    pub fn advance_to(&mut self, rv: u64) -> usize {
        let mut n = 0;
        while self.next_rv().is_some_and(|r| r <= rv) {
            let step = self.pending.pop_front().expect("checked");
            match step {
                Step::Write { event, object } => self.write(event, object),
                Step::Bookmark { kind, rv } => {
                    self.rv = self.rv.max(rv);
                    self.log.push(Entry::Bookmark { kind, rv });
                }
            }
            n += 1;
        }
        if rv != u64::MAX {
            // Writes to other objects (Services, Endpoints, leases) moved the revision too.
            self.rv = self.rv.max(rv);
        }
        n
    }

    /// Stores one write. The object's resourceVersion must be above the current one.
    pub fn write(&mut self, event: EventType, object: Object) {
        assert!(
            object.rv > self.rv,
            "resourceVersion {} is not after {}",
            object.rv,
            self.rv
        );
        self.rv = object.rv;
        let key = (object.kind, object.namespace.clone(), object.name.clone());
        let before = match event {
            EventType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key, object.clone()),
        }
        .map(|o| o.labels);
        self.log.push(Entry::Write {
            event,
            object,
            before,
        });
    }

    /// A periodic bookmark for every kind at the current resourceVersion.
    pub fn bookmark(&mut self) {
        for kind in [Kind::EndpointSlice, Kind::Pod] {
            self.log.push(Entry::Bookmark { kind, rv: self.rv });
        }
    }

    /// The objects of `kind` in `namespace` that `selector` selects, ordered by name.
    pub fn list(&self, kind: Kind, namespace: Option<&str>, selector: &Selector) -> Vec<&Object> {
        self.objects
            .values()
            .filter(|o| {
                o.kind == kind && namespace.is_none_or(|ns| o.namespace == ns) && selector.matches(&o.labels)
            })
            .collect()
    }

    /// The watch lines for `kind` after resourceVersion `after`, and the resourceVersion
    /// reached. A write that moves an object into or out of the selector becomes ADDED or
    /// DELETED, as the API server's watch cache does.
    pub fn events_after(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: &Selector,
        after: u64,
        bookmarks: bool,
    ) -> (Vec<String>, u64) {
        let mut lines = Vec::new();
        let mut cursor = after;
        let start = self.log.partition_point(|e| e.rv() <= after);
        for entry in &self.log[start..] {
            match entry {
                Entry::Write {
                    event,
                    object,
                    before,
                } => {
                    cursor = cursor.max(object.rv);
                    if object.kind != kind || namespace.is_some_and(|ns| object.namespace != ns) {
                        continue;
                    }
                    let now = selector.matches(&object.labels) && *event != EventType::Deleted;
                    let was = before.as_ref().is_some_and(|l| selector.matches(l));
                    let shown = match (was, now, event) {
                        (_, _, EventType::Deleted) if selector.matches(&object.labels) => Some("DELETED"),
                        (_, _, EventType::Deleted) => None,
                        (true, true, _) => Some("MODIFIED"),
                        (false, true, _) => Some("ADDED"),
                        (true, false, _) => Some("DELETED"),
                        (false, false, _) => None,
                    };
                    if let Some(t) = shown {
                        lines.push(event_line(t, &object.text));
                    }
                }
                Entry::Bookmark { kind: k, rv } => {
                    cursor = cursor.max(*rv);
                    if *k == kind && bookmarks {
                        lines.push(event_line("BOOKMARK", &k.bookmark_object(*rv, false)));
                    }
                }
            }
        }
        (lines, cursor.max(after))
    }
}
