//! Offline validation of Kubernetes objects against the API's own types (k8s-openapi, the
//! Kubernetes 1.33 API): an object must deserialize into its kind's type (right field types,
//! required fields present), and serializing it back must keep every field it had — so a
//! misspelled or misplaced field, which the API server would reject in strict mode (or drop
//! silently otherwise), is an error here too.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Every field of `orig` that `back` does not carry with the same value.
fn lost(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                match b.get(k) {
                    Some(bv) => lost(v, bv, &format!("{path}.{k}"), out),
                    None if empty(v) => {}
                    None => out.push(format!("{path}.{k}: unknown field")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (v, bv)) in o.iter().zip(b).enumerate() {
                lost(v, bv, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path}: {o} became {b}")),
    }
}

/// Validates one object; returns its problems (empty when valid).
pub fn validate(doc: &Value) -> Vec<String> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let what = format!("{kind}/{name}");
    let back = match (api, kind) {
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Secret") => round_trip::<Secret>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("apps/v1", "StatefulSet") => round_trip::<StatefulSet>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        _ => return vec![format!("{what}: {api} {kind} is not a kind this test knows")],
    };
    let mut problems = Vec::new();
    if name.is_empty() {
        problems.push(format!("{what}: metadata.name is required"));
    }
    match back {
        Err(e) => problems.push(format!("{what}: {e}")),
        Ok(back) => {
            let mut out = Vec::new();
            lost(doc, &back, "", &mut out);
            problems.extend(out.into_iter().map(|p| format!("{what}: {p}")));
        }
    }
    problems
}
