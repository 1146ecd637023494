//! The deployment files in `deploy/` as far as they can be checked without a cluster or a
//! container engine: every YAML document parses, and the Kubernetes example agrees with the
//! policy it ships (the policy compiles; probes, ports, mounts, Secret and ConfigMap keys
//! match what the policy names); the Dockerfile and the systemd unit run what they say.

use residency_proxy::policy::Policy;
use residency_proxy::policy::model::{ConsentStore, LogTarget};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_yaml_file_parses_and_the_kubernetes_ones_into_kubernetes_objects() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    assert!(!files.is_empty(), "no YAML under deploy/");
    for f in files {
        let docs = documents(&f);
        assert!(!docs.is_empty(), "{}: empty", f.display());
        // deploy/grafana holds Prometheus rule files, not Kubernetes objects.
        if !f.starts_with(deploy().join("kubernetes")) {
            continue;
        }
        for d in docs {
            for key in ["apiVersion", "kind"] {
                assert!(
                    d[key].is_string(),
                    "{}: a document without {key}",
                    f.display()
                );
            }
            assert!(
                d["metadata"]["name"].is_string(),
                "{}: a {} without a name",
                f.display(),
                d["kind"]
            );
        }
    }
}

struct Example {
    docs: Vec<Value>,
}

impl Example {
    fn load() -> Example {
        Example {
            docs: documents(&deploy().join("kubernetes/residency-proxy.yaml")),
        }
    }

    fn object(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn of_kind(&self, kind: &str) -> &Value {
        let mut found = self.docs.iter().filter(|d| d["kind"] == kind);
        let one = found.next().unwrap_or_else(|| panic!("no {kind}"));
        assert!(found.next().is_none(), "more than one {kind}");
        one
    }
}

fn port_of(addr: std::net::SocketAddr) -> u64 {
    u64::from(addr.port())
}

/// The container port with this name.
fn named_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

/// The volume mount holding `file`, and the path of `file` inside it.
fn mount_of<'a>(container: &'a Value, file: &Path) -> (&'a Value, PathBuf) {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|m| {
            let at = Path::new(m["mountPath"].as_str().unwrap());
            file.strip_prefix(at)
                .ok()
                .map(|rest| (m, rest.to_path_buf()))
        })
        .unwrap_or_else(|| {
            panic!(
                "{} is on no volume of {}",
                file.display(),
                container["name"]
            )
        })
}

#[test]
fn the_kubernetes_example_agrees_with_its_policy() {
    let ex = Example::load();
    let text = ex.object("ConfigMap", "residency-proxy-policy")["data"]["policy.toml"]
        .as_str()
        .expect("the policy is in the ConfigMap");
    let policy: Policy = residency_proxy::policy::compile::from_str("policy.toml", text)
        .unwrap_or_else(|e| panic!("the ConfigMap's policy does not compile: {e}"));

    let deployment = ex.of_kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "residency-proxy")
        .expect("a residency-proxy container");
    let volume = |name: &str| -> &Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };

    // The container runs `serve --policy P`, and P is the ConfigMap's key.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "serve");
    let at = args
        .iter()
        .position(|a| *a == "--policy")
        .expect("--policy");
    let policy_file = Path::new(args[at + 1]);
    let (mount, inside) = mount_of(container, policy_file);
    let cm = &volume(mount["name"].as_str().unwrap())["configMap"];
    assert_eq!(cm["name"], "residency-proxy-policy");
    assert!(
        cm["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["key"] == "policy.toml" && Path::new(i["path"].as_str().unwrap()) == inside),
        "the policy file is not the ConfigMap's policy.toml"
    );

    // Ports and probes.
    assert_eq!(named_port(container, "https"), port_of(policy.proxy.listen));
    assert_eq!(named_port(container, "admin"), port_of(policy.admin.listen));
    assert!(
        policy.admin.listen.ip().is_unspecified(),
        "the kubelet probes the Pod address: the admin listener must not be loopback-only"
    );
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "admin", "{probe}");
    }
    let service = ex.of_kind("Service");
    for p in service["spec"]["ports"].as_array().unwrap() {
        let target = p["targetPort"].as_str().expect("a named target port");
        named_port(container, target);
        assert_ne!(target, "admin", "the admin listener is not for the Service");
    }

    // Shutdown: preStop, then SIGTERM drains within drain_timeout, within the grace period.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop + policy.proxy.drain_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} leaves no time to drain"
    );

    // Every file the policy names is on a volume, and Secret/ConfigMap files are their keys.
    let mut files: Vec<PathBuf> = vec![
        policy.log.signing_key.clone().unwrap(),
        policy.admin.token_file.clone().unwrap(),
        policy.geo_database.clone().unwrap(),
    ];
    if let Some(tls) = &policy.tls {
        files.extend([tls.cert.clone(), tls.key.clone()]);
        files.extend(tls.client_ca.clone());
    }
    if let ConsentStore::File(p) = &policy.consent.store {
        files.push(p.clone());
    }
    for f in &files {
        let (mount, inside) = mount_of(container, f);
        let v = volume(mount["name"].as_str().unwrap());
        let key = inside.to_str().unwrap();
        if let Some(secret) = v["secret"]["secretName"].as_str() {
            let s = ex.object("Secret", secret);
            assert!(
                s["stringData"][key].is_string(),
                "Secret {secret} has no key {key}"
            );
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            let c = ex.object("ConfigMap", cm);
            assert!(
                c["data"][key].is_string(),
                "ConfigMap {cm} has no key {key}"
            );
        } else {
            assert!(v["persistentVolumeClaim"].is_object(), "{}", f.display());
        }
    }
    // The decision log is written, so its volume is not read-only.
    let LogTarget::File(log) = &policy.log.target else {
        panic!("the example logs to a file");
    };
    let (mount, _) = mount_of(container, log);
    assert_ne!(
        mount["readOnly"], true,
        "the decision log's volume is read-only"
    );
}

/// The instructions of the stage that starts at `FROM`, by stage.
fn stages(dockerfile: &str) -> Vec<Vec<String>> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut out: Vec<Vec<String>> = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("FROM ") {
            out.push(Vec::new());
        }
        out.last_mut().expect("FROM first").push(line.to_string());
    }
    out
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_ships_the_binary_in_a_small_one() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let stages = stages(&text);
    assert!(stages.len() >= 2, "not a multi-stage build");
    let build = &stages[0];
    assert!(build[0].ends_with(" AS build"), "{}", build[0]);
    assert!(
        build
            .iter()
            .any(|l| l.contains("cargo build --release --locked --bin residency-proxy")),
        "the build stage does not build the release binary"
    );
    let last = stages.last().unwrap();
    assert!(last[0].contains("distroless"), "{}", last[0]);
    let copy = last
        .iter()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the binary is copied from the build stage");
    let dest = copy.split_whitespace().last().unwrap();
    let entry = last
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("an ENTRYPOINT");
    assert!(
        entry.contains(&format!("\"{dest}\"")),
        "{entry} does not run {dest}"
    );
    assert!(
        last.iter().any(|l| l.starts_with("USER nonroot")),
        "runs as root"
    );
    // The context the build copies is what the .dockerignore lets through.
    let ignore = std::fs::read_to_string(deploy().join("Dockerfile.dockerignore")).unwrap();
    for needed in ["Cargo.toml", "Cargo.lock", "src/", "benches/", "policies/"] {
        assert!(
            ignore.contains(&format!("!{needed}")),
            "{needed} is not in the build context"
        );
    }
}

#[test]
fn the_systemd_unit_checks_reloads_and_stops_the_way_the_proxy_expects() {
    let text = std::fs::read_to_string(deploy().join("systemd/residency-proxy.service")).unwrap();
    let values = |key: &str| -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .collect()
    };
    let start = values("ExecStart");
    assert_eq!(start.len(), 1);
    let policy = start[0]
        .split_once("serve --policy ")
        .expect("ExecStart runs serve --policy")
        .1
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        values("ExecStartPre")
            .iter()
            .any(|c| c.ends_with(&format!("check {policy}")))
    );
    let reload = values("ExecReload");
    assert!(
        reload[0].ends_with(&format!("check {policy}")),
        "{reload:?}"
    );
    assert!(
        reload.iter().any(|c| c.contains("kill -HUP $MAINPID")),
        "{reload:?}"
    );
    assert_eq!(values("KillSignal"), ["SIGTERM"]);
    let stop: u64 = values("TimeoutStopSec")[0].parse().unwrap();
    assert!(
        stop > 30,
        "TimeoutStopSec {stop} is shorter than the default drain_timeout"
    );
}

/// Every metric the Grafana dashboard and the alert rules name is one `/metrics` exports,
/// read from a real proxy that exports them all: a database consent store read through the
/// cache, and a log that ships.
#[tokio::test]
async fn every_metric_the_dashboard_and_the_alert_rules_name_is_exported() {
    use crate::support::registry::{admin, home_store, registry_policy};
    let grafana = deploy().join("grafana");
    let mut named = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(grafana.join("residency-proxy-dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let rules = &documents(&grafana.join("alerts.yaml"))[0];
    let alerts: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    for rule in &alerts {
        exprs.push(rule["expr"].as_str().unwrap().to_string());
    }
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("residency_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            named.insert(name);
        }
    }
    // What the issue asks the rules to watch.
    let alert_text = serde_json::to_string(&alerts).unwrap();
    for watched in [
        "residency_log_writable",
        "residency_log_append_duration_seconds_bucket",
        "residency_consent_feed_lag_seconds",
        "residency_policy_reloads_total",
        "residency_decisions_total",
        "residency_log_ship_oldest_unshipped_seconds",
    ] {
        assert!(
            alert_text.contains(watched),
            "no alert rule watches {watched}"
        );
    }

    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let home = home_store().await;
    let shipped = url::Url::from_directory_path(db.path().join("bucket")).unwrap();
    let mut proxy = registry_policy(&store, &home)
        .log(&format!("ship = {{ url = '{shipped}' }}"))
        .start()
        .await;
    let text = admin(&proxy, "GET", "/metrics", None, None).await.text();
    let mut exported = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.insert(name.to_string());
            // OpenMetrics names a counter's family without the `_total` of its sample.
            if kind == "counter" {
                exported.insert(format!("{name}_total"));
            }
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    proxy.shutdown().await;
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(named.len() > 25, "{named:?}");
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
}
