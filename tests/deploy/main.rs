//! `deploy/` checked offline: the Kubernetes manifests and the Helm chart (rendered with its
//! default values and every documented example) are valid objects of the Kubernetes API; the
//! RBAC grants only discovery reads; every workload runs sluice as non-root with readiness and
//! liveness probes on the admin listener; selectors match; the sluice configurations they
//! carry pass `sluice check`; and the Dockerfile is multi-stage and non-root.
//!
//! Neither kubectl (its dry run needs an API server) nor helm is needed: objects are checked
//! against the API's own types (see `k8s.rs`) and the chart is rendered by `template.rs`,
//! which implements exactly the template features the chart uses.

mod k8s;
mod schema;
mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The YAML documents of a file (empty documents dropped).
fn documents(text: &str, origin: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}\n{text}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The manifests in deploy/kubernetes, by file name.
fn manifests() -> Vec<(String, Vec<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "rbac, sidecar, deployment and service replacement: {files:?}"
    );
    files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let docs = documents(&read(p), &name);
            (name, docs)
        })
        .collect()
}

fn chart() -> PathBuf {
    deploy().join("helm/sluice")
}

/// Deep-merges `over` into `base` (maps merge, everything else is replaced), as Helm merges
/// values files.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The chart's values: defaults, merged with an example file if given.
fn values(example: Option<&Path>) -> Value {
    let mut v = documents(&read(&chart().join("values.yaml")), "values.yaml").remove(0);
    if let Some(p) = example {
        let over = documents(&read(p), &p.display().to_string()).remove(0);
        merge(&mut v, &over);
    }
    v
}

fn schema_errors(values: &Value) -> Vec<String> {
    let schema: Value =
        serde_json::from_str(&read(&chart().join("values.schema.json"))).expect("schema JSON");
    let mut errors = Vec::new();
    schema::validate(&schema, values, "values", &mut errors);
    errors
}

/// Renders the chart as release `name` in namespace `ns`: (template file, output).
fn render(values: &Value, name: &str, ns: &str) -> Vec<(String, String)> {
    let chart_meta = documents(&read(&chart().join("Chart.yaml")), "Chart.yaml").remove(0);
    let mut templates = template::Templates::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        templates.add(&file, &read(f)).unwrap_or_else(|e| panic!("{e}"));
    }
    let root = json!({
        "Values": values,
        "Release": {"Name": name, "Namespace": ns, "Service": "Helm"},
        "Chart": {
            "Name": chart_meta["name"],
            "Version": chart_meta["version"],
            "AppVersion": chart_meta["appVersion"],
        },
    });
    templates
        .render(&root)
        .unwrap_or_else(|e| panic!("rendering failed: {e}"))
}

/// The objects a render produces (NOTES.txt and helpers are not manifests).
fn rendered_objects(rendered: &[(String, String)]) -> Vec<Value> {
    rendered
        .iter()
        .filter(|(f, _)| f.ends_with(".yaml"))
        .flat_map(|(f, text)| documents(text, f))
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Runs `sluice check` on a configuration text.
fn sluice_check(toml: &str, origin: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run sluice check");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{origin}: sluice check failed:\n{}{}\n{toml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The admin port of a sluice configuration.
fn admin_port(toml: &str) -> Option<i64> {
    let t: toml::Table = toml.parse().ok()?;
    let listen = t.get("admin")?.get("listen")?.as_str()?;
    listen.rsplit_once(':')?.1.parse().ok()
}

/// Every check that applies to a set of objects deployed together; returns the problems.
fn check_objects(objects: &[Value], origin: &str) -> Vec<String> {
    let mut problems: Vec<String> = objects
        .iter()
        .flat_map(k8s::validate)
        .map(|p| format!("{origin}: {p}"))
        .collect();
    // Configurations carried in Secrets/ConfigMaps, by object name.
    let mut configs: BTreeMap<String, String> = BTreeMap::new();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        let data = match kind {
            "Secret" => &o["stringData"],
            "ConfigMap" => &o["data"],
            _ => continue,
        };
        if let Some(toml) = data["sluice.toml"].as_str() {
            if let Err(e) = sluice_check(toml, origin) {
                problems.push(e);
            }
            configs.insert(
                o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                toml.to_string(),
            );
        }
    }
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let at = format!("{origin}: {kind}/{name}");
        match kind {
            "Role" | "ClusterRole" => {
                if kind == "ClusterRole" {
                    problems.push(format!("{at}: sluice needs no cluster-wide access"));
                }
                let mut rules: Vec<(String, String, Vec<String>)> = Vec::new();
                for r in o["rules"].as_array().into_iter().flatten() {
                    for g in r["apiGroups"].as_array().into_iter().flatten() {
                        for res in r["resources"].as_array().into_iter().flatten() {
                            let verbs = r["verbs"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|v| v.as_str().unwrap_or_default().to_string());
                            rules.push((
                                g.as_str().unwrap_or_default().into(),
                                res.as_str().unwrap_or_default().into(),
                                verbs.collect(),
                            ));
                        }
                    }
                }
                rules.sort();
                let read = vec!["get".to_string(), "list".into(), "watch".into()];
                let want = vec![
                    (String::new(), "pods".to_string(), read.clone()),
                    ("discovery.k8s.io".to_string(), "endpointslices".to_string(), read),
                ];
                if rules != want {
                    problems.push(format!(
                        "{at}: rules are {rules:?}, want exactly get/list/watch on pods and endpointslices"
                    ));
                }
            }
            "Deployment" | "StatefulSet" => {
                let spec = &o["spec"];
                let pod_labels = &spec["template"]["metadata"]["labels"];
                if !labels_match(&spec["selector"]["matchLabels"], pod_labels) {
                    problems.push(format!("{at}: selector does not match the pod labels"));
                }
                let pod = &spec["template"]["spec"];
                let containers = pod["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(pod["initContainers"].as_array().into_iter().flatten());
                let mut found = false;
                for c in containers.filter(|c| c["image"].as_str().is_some_and(|i| i.contains("sluice"))) {
                    found = true;
                    let cname = c["name"].as_str().unwrap_or_default();
                    let at = format!("{at} container {cname}");
                    let non_root = c["securityContext"]["runAsNonRoot"] == true
                        || pod["securityContext"]["runAsNonRoot"] == true;
                    if !non_root {
                        problems.push(format!("{at}: must run as non-root"));
                    }
                    if c["securityContext"]["allowPrivilegeEscalation"] != false
                        || c["securityContext"]["readOnlyRootFilesystem"] != true
                    {
                        problems.push(format!(
                            "{at}: no privilege escalation, read-only root filesystem"
                        ));
                    }
                    // Probes hit /readyz and /healthz on the admin port of the mounted config.
                    let ports = c["ports"].as_array().cloned().unwrap_or_default();
                    let port_number = |p: &Value| -> Option<i64> {
                        p.as_i64().or_else(|| {
                            ports
                                .iter()
                                .find(|x| x["name"] == *p)
                                .and_then(|x| x["containerPort"].as_i64())
                        })
                    };
                    let readiness = &c["readinessProbe"]["httpGet"];
                    let liveness = &c["livenessProbe"]["httpGet"];
                    if readiness["path"] != "/readyz" || liveness["path"] != "/healthz" {
                        problems.push(format!("{at}: readiness must GET /readyz and liveness /healthz"));
                    }
                    let volume = pod["volumes"].as_array().into_iter().flatten().find(|v| {
                        c["volumeMounts"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|m| m["name"] == v["name"] && m["mountPath"] == "/etc/sluice")
                    });
                    let secret = volume.and_then(|v| {
                        v["secret"]["secretName"]
                            .as_str()
                            .or(v["configMap"]["name"].as_str())
                    });
                    match secret.and_then(|s| configs.get(s)) {
                        Some(toml) => {
                            let admin = admin_port(toml);
                            if admin.is_none()
                                || port_number(&readiness["port"]) != admin
                                || port_number(&liveness["port"]) != admin
                            {
                                problems.push(format!(
                                    "{at}: probes must use the admin port {admin:?} of the configuration"
                                ));
                            }
                        }
                        None if secret.is_some() => {} // an existing Secret, not part of this set
                        None => problems.push(format!("{at}: no configuration mounted at /etc/sluice")),
                    }
                    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
                    if grace < 10 {
                        problems.push(format!(
                            "{at}: terminationGracePeriodSeconds {grace} leaves no time to drain"
                        ));
                    }
                }
                if !found {
                    problems.push(format!("{at}: no sluice container"));
                }
            }
            "Service" | "PodDisruptionBudget" => {
                let selector = if kind == "Service" {
                    &o["spec"]["selector"]
                } else {
                    &o["spec"]["selector"]["matchLabels"]
                };
                if selector.is_null() {
                    continue;
                }
                let ns = &o["metadata"]["namespace"];
                let selects_something = objects.iter().any(|w| {
                    matches!(w["kind"].as_str(), Some("Deployment" | "StatefulSet"))
                        && &w["metadata"]["namespace"] == ns
                        && labels_match(selector, &w["spec"]["template"]["metadata"]["labels"])
                });
                // A Service may select database pods defined elsewhere; a PDB must cover sluice.
                if kind == "PodDisruptionBudget" && !selects_something {
                    problems.push(format!("{at}: selects no workload"));
                }
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn manifests_are_valid_and_complete() {
    let mut problems = Vec::new();
    let mut kinds = BTreeMap::new();
    for (file, docs) in manifests() {
        problems.extend(check_objects(&docs, &file));
        for d in &docs {
            *kinds
                .entry(d["kind"].as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for kind in [
        "Deployment",
        "Service",
        "Role",
        "RoleBinding",
        "ServiceAccount",
        "PodDisruptionBudget",
        "Secret",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} in deploy/kubernetes: {kinds:?}"
        );
    }
}

#[test]
fn the_sidecar_listens_on_loopback_and_the_replacement_takes_the_service_name() {
    let all = manifests();
    let docs = |f: &str| all.iter().find(|(n, _)| n == f).map(|(_, d)| d.clone()).unwrap();
    let sidecar = docs("sidecar.yaml");
    let config = sidecar.iter().find(|d| d["kind"] == "Secret").unwrap()["stringData"]["sluice.toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(config.contains("listen = \"127.0.0.1:6432\""), "{config}");
    let deployment = sidecar.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let init = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["restartPolicy"], "Always", "a native sidecar");
    // Service replacement: "pg" selects the sluice pods, "pg-instances" the database pods.
    let replacement = docs("service-replacement.yaml");
    let svc = |n: &str| {
        replacement
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == n)
            .cloned()
            .unwrap()
    };
    let sluice_pods = &replacement.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]
        ["metadata"]["labels"];
    assert!(labels_match(&svc("pg")["spec"]["selector"], sluice_pods));
    assert!(!labels_match(
        &svc("pg-instances")["spec"]["selector"],
        sluice_pods
    ));
}

#[test]
fn chart_renders_with_its_defaults_and_every_documented_example() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(chart().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    assert!(!examples.is_empty());
    let mut cases: Vec<(String, Value)> = vec![("defaults".into(), values(None))];
    cases.extend(examples.iter().map(|p| {
        (
            p.file_name().unwrap().to_string_lossy().into_owned(),
            values(Some(p)),
        )
    }));
    for (name, vals) in cases {
        let errors = schema_errors(&vals);
        assert!(
            errors.is_empty(),
            "{name}: values do not match values.schema.json:\n{}",
            errors.join("\n")
        );
        let rendered = render(&vals, "orders", "apps");
        if std::env::var_os("SLUICE_PRINT_CHART").is_some() {
            // See what the chart renders, without helm:
            //   SLUICE_PRINT_CHART=1 cargo test --test deploy chart_renders -- --nocapture
            for (file, text) in &rendered {
                println!("# --- {name}: {file}\n{text}");
            }
        }
        let objects = rendered_objects(&rendered);
        let problems = check_objects(&objects, &name);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert!(
            kinds.contains(&"Deployment") && kinds.contains(&"Service"),
            "{name}: {kinds:?}"
        );
        let notes = rendered
            .iter()
            .find(|(f, _)| f == "NOTES.txt")
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        assert!(notes.contains("orders-sluice"), "{name}: NOTES.txt: {notes}");
        // The Role lives where the database is, and binds the release's ServiceAccount.
        if let Some(role) = objects.iter().find(|o| o["kind"] == "Role") {
            let want = vals["database"]["namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("apps");
            assert_eq!(role["metadata"]["namespace"], want, "{name}");
        }
    }
}

#[test]
fn chart_renders_what_the_values_say() {
    let vals = values(Some(&chart().join("examples/patroni.yaml")));
    let objects = rendered_objects(&render(&vals, "acid", "proxies"));
    let secret = objects
        .iter()
        .find(|o| o["kind"] == "Secret")
        .expect("config Secret");
    let toml = secret["stringData"]["sluice.toml"].as_str().unwrap();
    for want in [
        "service = [\"acid-pg\",\"acid-pg-repl\"]",
        "port = \"postgresql\"",
        "roles = \"patroni\"",
        "pod_selector = \"cluster-name=acid-pg\"",
        "namespace = \"db\"",
        "name = \"app\"",
    ] {
        assert!(toml.contains(want), "missing {want:?} in:\n{toml}");
    }
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["metadata"]["name"], "acid-sluice");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/sluice-proxy/sluice:0.1.0"
    );
    // Service replacement with an existing Secret: no generated Secret, the Service takes
    // the database's name.
    let vals = values(Some(&chart().join("examples/service-replacement.yaml")));
    let objects = rendered_objects(&render(&vals, "pg", "db"));
    assert!(objects.iter().all(|o| o["kind"] != "Secret"));
    let svc = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    assert_eq!(svc["metadata"]["name"], "pg");
    let vol = &objects.iter().find(|o| o["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]
        ["volumes"][0];
    assert_eq!(vol["secret"]["secretName"], "pg-sluice-config");
}

#[test]
fn the_values_schema_rejects_bad_values() {
    for (bad, path) in [
        (json!({"database": {"roles": "stolon"}}), "values.database.roles"),
        (json!({"cluster": {"port": 0}}), "values.cluster.port"),
        (json!({"replicas": 2}), "values.replicas"),
        (
            json!({"shutdown": {"drainTimeout": "soon"}}),
            "values.shutdown.drainTimeout",
        ),
        (json!({"users": [{"name": "app"}]}), "values.users[0].password"),
    ] {
        let mut v = values(None);
        merge(&mut v, &bad);
        let errors = schema_errors(&v);
        assert!(errors.iter().any(|e| e.starts_with(path)), "{bad}: {errors:?}");
    }
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_non_root() {
    let text = read(&deploy().join("Dockerfile"));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let last = &lines[*stages.last().unwrap()..];
    assert!(
        last[0].contains("distroless") || last[0].contains("scratch"),
        "small final image: {}",
        last[0]
    );
    assert!(
        last.iter().any(|l| l.starts_with("COPY --from=")),
        "the final stage copies the binary"
    );
    let user = last
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the final stage");
    let uid = user["USER ".len()..].split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "numeric non-root user: {user}"
    );
    assert!(last
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT") && l.contains("sluice")));
    assert!(text.contains("--bin sluice"), "builds the sluice binary");
}

#[test]
fn the_checks_catch_mistakes() {
    let good = manifests()
        .into_iter()
        .find(|(f, _)| f == "deployment.yaml")
        .unwrap()
        .1;
    let mutate = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut docs = good.clone();
        f(&mut docs);
        check_objects(&docs, "mutated").join("\n")
    };
    let deployment =
        |docs: &mut Vec<Value>| -> usize { docs.iter().position(|d| d["kind"] == "Deployment").unwrap() };
    // A misspelled field, a wrong type, a wrong probe, root, a config sluice rejects.
    let typo = mutate(&|d| {
        let i = deployment(d);
        d[i]["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = json!({});
        d[i]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        d[i]["spec"]["template"]["spec"]["containers"][0]["resource"] = json!({"limits": {"memory": "1Gi"}});
    });
    assert!(typo.contains("resource: unknown field"), "{typo}");
    let wrong_type = mutate(&|d| {
        let i = deployment(d);
        d[i]["spec"]["replicas"] = json!("two");
    });
    assert!(wrong_type.contains("Deployment/sluice"), "{wrong_type}");
    let probe = mutate(&|d| {
        let i = deployment(d);
        d[i]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] =
            json!("postgres");
    });
    assert!(probe.contains("admin port"), "{probe}");
    let root = mutate(&|d| {
        let i = deployment(d);
        d[i]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
    });
    assert!(root.contains("non-root"), "{root}");
    let config = mutate(&|d| {
        let s = d.iter().position(|x| x["kind"] == "Secret").unwrap();
        let toml = d[s]["stringData"]["sluice.toml"]
            .as_str()
            .unwrap()
            .replace("roles = \"cloudnative-pg\"", "roles = \"stolon\"");
        d[s]["stringData"]["sluice.toml"] = json!(toml);
    });
    assert!(
        config.contains("sluice check failed") && config.contains("roles"),
        "{config}"
    );
    let rbac = manifests().into_iter().find(|(f, _)| f == "rbac.yaml").unwrap().1;
    let mut wide = rbac.clone();
    wide[1]["rules"][1]["resources"] = json!(["pods", "secrets"]);
    assert!(check_objects(&wide, "rbac").join("\n").contains("want exactly"));
}
