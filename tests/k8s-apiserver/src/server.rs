//! The HTTP side: routing, bearer tokens and RBAC, LIST with pagination, WATCH streams.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::chunks::{self, Chunker};
use crate::scenario::{EventType, Kind, Object, Scenario};
use crate::selector::Selector;
use crate::store::{event_line, Store};

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// The token every scenario accepts, as user `admin` with every right.
pub const ADMIN_TOKEN: &str = "devtoken";

/// What a user may do: `None` is everything; otherwise (resource, verb) pairs, in one
/// namespace (a RoleBinding) or everywhere (a ClusterRoleBinding: namespace `None`).
type Grants = Option<(Option<String>, Vec<(String, String)>)>;

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub user: String,
    pub status: u16,
}

impl RequestLog {
    /// Whether this was a WATCH.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true" || w == "1")
    }

    /// Whether this was a LIST (or GET) of `resource`.
    pub fn is_list_of(&self, resource: &str) -> bool {
        !self.is_watch() && self.path.ends_with(&format!("/{resource}"))
    }
}

struct Control {
    store: Store,
    tokens: HashMap<String, (String, Grants)>,
    requests: Vec<RequestLog>,
    /// Caps `timeoutSeconds` of watches, to make clients reconnect sooner.
    watch_timeout_cap: Option<Duration>,
}

struct Shared {
    control: Mutex<Control>,
    /// Bumped on every change a watch may want to send.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch cleanly (as `timeoutSeconds` would).
    end_watches: watch::Sender<u64>,
    /// True while the server plays dead: connections are dropped and watches cut.
    down: watch::Sender<bool>,
    /// True while the server hangs (a SIGSTOPped kube-apiserver): connections are accepted
    /// (the kernel does that) but nothing is read or answered, and open watches send nothing.
    hung: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// A fake kube-apiserver on 127.0.0.1 serving one recorded scenario.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.down.send_replace(true);
    }
}

impl FakeApiServer {
    /// Starts serving `scenario` on a free port of 127.0.0.1.
    pub async fn start(scenario: Scenario) -> std::io::Result<FakeApiServer> {
        FakeApiServer::start_on("127.0.0.1:0".parse().expect("valid"), scenario).await
    }

    /// Starts serving `scenario` on `addr`.
    pub async fn start_on(addr: SocketAddr, scenario: Scenario) -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut tokens = HashMap::new();
        tokens.insert(ADMIN_TOKEN.to_string(), ("admin".to_string(), None));
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                store: Store::new(scenario),
                tokens,
                requests: Vec::new(),
                watch_timeout_cap: None,
            }),
            changed: watch::channel(0).0,
            end_watches: watch::channel(0).0,
            down: watch::channel(false).0,
            hung: watch::channel(false).0,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeApiServer { addr, shared, task })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server URL for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file's text that points at this server with `token`, namespace `db`.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: {token}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: db\n\
             current-context: fake\n",
            self.url()
        )
    }

    /// Accepts `token` as `user`, allowed only the (resource, verb) pairs in `grants`
    /// (`None`: everything) in `namespace` (`None`: every namespace).
    pub fn add_token(
        &self,
        token: &str,
        user: &str,
        namespace: Option<&str>,
        grants: Option<&[(&str, &str)]>,
    ) {
        let grants = grants.map(|g| {
            (
                namespace.map(str::to_string),
                g.iter().map(|(r, v)| (r.to_string(), v.to_string())).collect(),
            )
        });
        self.shared
            .lock()
            .tokens
            .insert(token.to_string(), (user.to_string(), grants));
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.shared.lock().store.rv
    }

    /// The resourceVersion of the next recorded step, if any is left.
    pub fn next_rv(&self) -> Option<u64> {
        self.shared.lock().store.next_rv()
    }

    /// Applies the recorded steps up to and including `rv` and lets open watches see them.
    pub fn advance_to(&self, rv: u64) -> usize {
        let n = self.shared.lock().store.advance_to(rv);
        self.shared.bump();
        n
    }

    /// Applies every remaining recorded step.
    pub fn advance_all(&self) -> usize {
        self.advance_to(u64::MAX)
    }

    /// Writes an object (watch-form JSON) at the next resourceVersion, as a controller
    /// would. Its `resourceVersion` field is replaced.
    pub fn write(&self, event: EventType, object_text: &str) -> u64 {
        let rv = {
            let mut c = self.shared.lock();
            let rv = c.store.rv + 1;
            let mut v: serde_json::Value = serde_json::from_str(object_text).expect("object JSON");
            v["metadata"]["resourceVersion"] = serde_json::Value::String(rv.to_string());
            let object = Object::from_watch_text(&v.to_string()).expect("valid object");
            c.store.write(event, object);
            rv
        };
        self.shared.bump();
        rv
    }

    /// The current watch-form text of an object.
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<String> {
        let c = self.shared.lock();
        c.store
            .list(kind, Some(namespace), &Selector::default())
            .into_iter()
            .find(|o| o.name == name)
            .map(|o| o.text.clone())
    }

    /// Sends a periodic BOOKMARK (at the current resourceVersion) to every watch that asked
    /// for bookmarks and has not seen that resourceVersion yet.
    pub fn bookmark(&self) {
        self.shared.lock().store.bookmark();
        self.shared.bump();
    }

    /// Compacts history at the current resourceVersion: watches from an older one get
    /// `410 Expired` (an ERROR event in a 200 response, as the real server sends), and every
    /// open watch ends, so clients reconnect — and re-list if they had fallen behind.
    pub fn expire(&self) {
        let rv = self.rv();
        self.compact(rv);
        self.end_watches();
    }

    /// Makes watches from a resourceVersion below `rv` fail with `410 Expired`.
    pub fn compact(&self, rv: u64) {
        self.shared.lock().store.compacted = rv;
    }

    /// Ends every open watch with the terminating chunk, as `timeoutSeconds` would.
    pub fn end_watches(&self) {
        self.shared.end_watches.send_modify(|g| *g += 1);
    }

    /// Caps the `timeoutSeconds` of watches.
    pub fn set_watch_timeout_cap(&self, cap: Option<Duration>) {
        self.shared.lock().watch_timeout_cap = cap;
    }

    /// An API server outage: while down, connections are accepted and dropped at once, and
    /// open connections (watches included) are cut.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// An API server that hangs (SIGSTOP) while `hung`: it keeps every TCP connection and
    /// accepts new ones, but answers nothing and sends nothing on open watches until it is
    /// resumed, when everything waiting is served as if nothing happened.
    pub fn set_hung(&self, hung: bool) {
        self.shared.hung.send_replace(hung);
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.lock().requests.clone()
    }

    /// The exact body a LIST of `kind` in `namespace` with `selector` returns now.
    pub fn list_body(&self, kind: Kind, namespace: &str, selector: &str) -> String {
        let c = self.shared.lock();
        let sel = Selector::parse(selector).expect("valid selector");
        let items: Vec<&Object> = c.store.list(kind, Some(namespace), &sel);
        list_writes(kind, c.store.rv, None, &items).concat()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if *shared.down.borrow() {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut down = shared.down.subscribe();
            let mut hung = shared.hung.subscribe();
            tokio::select! {
                _ = while_hung(&mut hung) => {}
                _ = went_down(&mut down) => return,
            }
            let svc_shared = shared.clone();
            let svc = service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = went_down(&mut down) => {}
            }
        });
    }
}

/// A `Status` body in the API server's field order.
fn status_body(code: u16, reason: &str, message: &str, details: Option<&str>) -> String {
    let details = details.map(|d| format!(r#","details":{d}"#)).unwrap_or_default();
    format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":{},"reason":{}{details},"code":{code}}}"#,
        serde_json::Value::String(message.into()),
        serde_json::Value::String(reason.into())
    ) + "\n"
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("content-type", "application/json".parse().expect("valid"));
    h.insert("cache-control", "no-cache, private".parse().expect("valid"));
    h.insert("content-length", len.to_string().parse().expect("valid"));
    r
}

fn chunked_response(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response<Body> {
    let s = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
    let h = r.headers_mut();
    h.insert("content-type", "application/json".parse().expect("valid"));
    h.insert("cache-control", "no-cache, private".parse().expect("valid"));
    r
}

/// Decodes `a=b&c=d` (with `+` and `%XX`), skipping empty parts (kube sends `?&…`).
fn parse_query(q: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match std::str::from_utf8(&bytes[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// (kind, namespace, object name) of a resource path.
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    let (kind, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
        (Kind::Pod, r)
    } else if let Some(r) = path.strip_prefix("/apis/discovery.k8s.io/v1/") {
        (Kind::EndpointSlice, r)
    } else {
        return None;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, tail) = match parts.as_slice() {
        ["namespaces", ns, tail @ ..] => (Some(ns.to_string()), tail),
        tail => (None, tail),
    };
    match tail {
        [res] if *res == kind.resource() => Some((kind, ns, None)),
        [res, name] if *res == kind.resource() => Some((kind, ns, Some(name.to_string()))),
        _ => None,
    }
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    while_hung(&mut shared.hung.subscribe()).await;
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or_default());
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let (response, user, status) = answer(shared, req.method().as_str(), &path, &query, token.as_deref());
    shared.lock().requests.push(RequestLog {
        method: req.method().to_string(),
        path,
        query,
        user,
        status,
    });
    response
}

fn answer(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    token: Option<&str>,
) -> (Response<Body>, String, u16) {
    let control = shared.lock();
    let (user, grants) = match token {
        None => ("system:anonymous".to_string(), Some((None, Vec::new()))),
        Some(t) => match control.tokens.get(t) {
            Some((u, g)) => (u.clone(), g.clone()),
            None => {
                let body = status_body(401, "Unauthorized", "Unauthorized", None);
                return (json_response(StatusCode::UNAUTHORIZED, body), String::new(), 401);
            }
        },
    };
    let fail = |code: u16, reason: &str, message: String, details: Option<String>| {
        let body = status_body(code, reason, &message, details.as_deref());
        (
            json_response(StatusCode::from_u16(code).expect("valid status"), body),
            user.clone(),
            code,
        )
    };
    if method != "GET" {
        return fail(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            None,
        );
    }
    let Some((kind, namespace, name)) = route(path) else {
        return fail(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some("{}".into()),
        );
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&name, watch) {
        (_, true) => "watch",
        (Some(_), false) => "get",
        (None, false) => "list",
    };
    let allowed = grants.as_ref().is_none_or(|(scope, rules)| {
        (scope.is_none() || *scope == namespace)
            && rules.iter().any(|(r, v)| r == kind.resource() && v == verb)
    });
    if !allowed {
        let group = kind.group();
        let resource = kind.qualified_resource();
        let scope = match &namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        let details = if group.is_empty() {
            format!(r#"{{"kind":"{}"}}"#, kind.resource())
        } else {
            format!(r#"{{"group":"{group}","kind":"{}"}}"#, kind.resource())
        };
        return fail(
            403,
            "Forbidden",
            format!(
                "{resource} is forbidden: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{group}\"{scope}",
                kind.resource()
            ),
            Some(details),
        );
    }
    let selector = match Selector::parse(query.get("labelSelector").map(String::as_str).unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => return fail(400, "BadRequest", e, None),
    };
    if let Some(name) = name {
        let found = control
            .store
            .list(kind, namespace.as_deref(), &Selector::default())
            .into_iter()
            .find(|o| o.name == name)
            .map(|o| o.text.clone());
        return match found {
            Some(text) => (json_response(StatusCode::OK, text + "\n"), user, 200),
            None => {
                let group = kind.group();
                let res = kind.qualified_resource();
                let details = if group.is_empty() {
                    format!(r#"{{"name":"{name}","kind":"{}"}}"#, kind.resource())
                } else {
                    format!(
                        r#"{{"name":"{name}","group":"{group}","kind":"{}"}}"#,
                        kind.resource()
                    )
                };
                fail(
                    404,
                    "NotFound",
                    format!("{res} \"{name}\" not found"),
                    Some(details),
                )
            }
        };
    }
    if watch {
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let timeout = control.watch_timeout_cap.map_or(timeout, |cap| timeout.min(cap));
        let spec = WatchSpec {
            kind,
            namespace,
            selector,
            rv: query.get("resourceVersion").cloned().unwrap_or_default(),
            bookmarks: query.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
            initial_events: query.get("sendInitialEvents").is_some_and(|b| b == "true"),
            timeout,
        };
        drop(control);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_watch(shared.clone(), spec, tx));
        return (chunked_response(rx), user, 200);
    }
    // LIST, with pagination.
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let start_after = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => match decode_continue(token) {
            Some((rv, start)) if rv >= control.store.compacted => Some(start),
            Some(_) => {
                return fail(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into(),
                    None,
                )
            }
            None => return fail(400, "BadRequest", format!("continue key is not valid: {token}"), None),
        },
    };
    let all = control.store.list(kind, namespace.as_deref(), &selector);
    let rest: Vec<&Object> = all
        .into_iter()
        .filter(|o| start_after.as_ref().is_none_or(|s| o.name.as_str() > s.as_str()))
        .collect();
    let (page, more) = match limit {
        Some(l) if rest.len() > l => (&rest[..l], true),
        _ => (&rest[..], false),
    };
    let next = more.then(|| encode_continue(control.store.rv, &page.last().expect("non-empty page").name));
    let writes = list_writes(kind, control.store.rv, next.as_deref(), page);
    drop(control);
    let mut chunker = Chunker::default();
    for w in &writes {
        chunker.write(w.as_bytes());
    }
    if chunker.nothing_sent() {
        return (json_response(StatusCode::OK, writes.concat()), user, 200);
    }
    chunker.flush();
    let chunks = chunker.take();
    let (tx, rx) = mpsc::channel(chunks.len().max(1));
    for c in chunks {
        tx.try_send(Ok(Bytes::from(c)))
            .expect("channel sized for every chunk");
    }
    (chunked_response(rx), user, 200)
}

/// The writes the API server's streaming list encoder makes: the list header up to `[`,
/// each item, a comma between items, then `]}` and a newline.
fn list_writes(kind: Kind, rv: u64, continue_token: Option<&str>, items: &[&Object]) -> Vec<String> {
    let cont = continue_token
        .map(|c| format!(r#","continue":"{c}""#))
        .unwrap_or_default();
    let mut writes = vec![format!(
        r#"{{"kind":"{}List","apiVersion":"{}","metadata":{{"resourceVersion":"{rv}"{cont}}},"items":["#,
        kind.name(),
        kind.api_version()
    )];
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            writes.push(",".into());
        }
        writes.push(o.list_text());
    }
    writes.push("]}\n".into());
    writes
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn unbase64url(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Some(out)
}

/// The API server's continue token: base64url of `{"v":"meta.k8s.io/v1","rv":RV,"start":"/NAME\u0000"}`.
fn encode_continue(rv: u64, last: &str) -> String {
    base64url(format!(r#"{{"v":"meta.k8s.io/v1","rv":{rv},"start":"/{last}\u0000"}}"#).as_bytes())
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(&unbase64url(token)?).ok()?;
    let rv = v["rv"].as_u64()?;
    let start = v["start"]
        .as_str()?
        .trim_start_matches('/')
        .trim_end_matches('\0');
    Some((rv, start.to_string()))
}

struct WatchSpec {
    kind: Kind,
    namespace: Option<String>,
    selector: Selector,
    rv: String,
    bookmarks: bool,
    initial_events: bool,
    timeout: Duration,
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<Result<Bytes, std::io::Error>>) {
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut changed = shared.changed.subscribe();
    let mut ended = shared.end_watches.subscribe();
    let mut down = shared.down.subscribe();
    let ns = spec.namespace.as_deref();
    let start = {
        let c = shared.lock();
        match spec.rv.parse::<u64>().ok().filter(|rv| *rv > 0) {
            Some(rv) if rv < c.store.compacted => {
                let message = format!("too old resource version: {rv} ({})", c.store.compacted);
                Err(event_line(
                    "ERROR",
                    status_body(410, "Expired", &message, None).trim_end(),
                ))
            }
            Some(rv) => Ok((Vec::new(), rv)),
            None => {
                // No resourceVersion (or 0): synthetic ADDED events for what exists now.
                let mut lines: Vec<String> = c
                    .store
                    .list(spec.kind, ns, &spec.selector)
                    .into_iter()
                    .map(|o| event_line(EventType::Added.as_str(), &o.text))
                    .collect();
                if spec.initial_events && spec.bookmarks {
                    lines.push(event_line(
                        "BOOKMARK",
                        &spec.kind.bookmark_object(c.store.rv, true),
                    ));
                }
                Ok((lines, c.store.rv))
            }
        }
    };
    let (mut first, mut cursor) = match start {
        Ok(s) => s,
        Err(expired) => {
            // An expired resourceVersion is a 200 with one ERROR event, then the end.
            let _ = tx.send(Ok(Bytes::from(expired))).await;
            return;
        }
    };
    let mut last = false;
    let mut hung = shared.hung.subscribe();
    loop {
        tokio::select! {
            _ = while_hung(&mut hung) => {}
            _ = went_down(&mut down) => {
                let _ = tx.send(Err(std::io::Error::other("API server went down"))).await;
                return;
            }
        }
        let (mut lines, next) = {
            let c = shared.lock();
            c.store
                .events_after(spec.kind, ns, &spec.selector, cursor, spec.bookmarks)
        };
        cursor = next;
        if !first.is_empty() {
            first.append(&mut lines);
            lines = std::mem::take(&mut first);
        }
        for chunk in chunks::burst(&lines) {
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
        }
        if last {
            // The terminating chunk follows when the body stream ends.
            return;
        }
        tokio::select! {
            r = changed.changed() => last = r.is_err(),
            _ = ended.changed() => last = true,
            _ = went_down(&mut down) => {
                let _ = tx.send(Err(std::io::Error::other("API server went down"))).await;
                return;
            }
            _ = tokio::time::sleep_until(deadline) => last = true,
        }
    }
}

/// Resolves once the server is not (or no longer) hung.
async fn while_hung(hung: &mut watch::Receiver<bool>) {
    let _ = hung.wait_for(|h| !*h).await;
}

/// Resolves once the server is (or goes) down.
async fn went_down(down: &mut watch::Receiver<bool>) {
    let _ = down.wait_for(|d| *d).await;
}
