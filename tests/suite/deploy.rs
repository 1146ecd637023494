//! The deployment files in `deploy/` as far as they can be checked without a cluster or a
//! container engine: every YAML document parses, and the Kubernetes example agrees with the
//! policy it ships (the policy compiles; probes, ports, mounts, Secret and ConfigMap keys
//! match what the policy names); the Dockerfile and the systemd unit run what they say. The
//! fleet's option agrees too: the sidecar whose rules come from a bundle compiles with the
//! bundle policy the weekly publishing job builds, and that job (a CronJob, or a systemd
//! timer) runs `geo update`, `bundle build`, `bundle verify` and the upload in order, each
//! command line accepted by the real command and each file on a volume.

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
        Example::from("kubernetes/residency-proxy.yaml")
    }

    /// The documents of a file under `deploy/`.
    fn from(file: &str) -> Example {
        Example {
            docs: documents(&deploy().join(file)),
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

/// The example's Pod spec and its `residency-proxy` container.
fn proxy_pod(ex: &Example) -> (&Value, &Value) {
    let deployment = ex.of_kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "residency-proxy")
        .expect("a residency-proxy container");
    (pod, container)
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn strings(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The value after `flag` in a command line.
fn flag<'a>(args: &[&'a str], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1]
}

/// The text of the file the container runs `serve --policy FILE` on, which must be the key
/// `key` of the ConfigMap `config_map`, mounted.
fn served_policy<'a>(ex: &'a Example, config_map: &str, key: &str) -> (PathBuf, &'a str) {
    let (pod, container) = proxy_pod(ex);
    let args = strings(&container["args"]);
    assert_eq!(args[0], "serve");
    let policy_file = Path::new(flag(&args, "--policy"));
    let (mount, inside) = mount_of(container, policy_file);
    let cm = &volume(pod, mount["name"].as_str().unwrap())["configMap"];
    assert_eq!(cm["name"], config_map);
    assert!(
        cm["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["key"] == key && Path::new(i["path"].as_str().unwrap()) == inside),
        "the policy file is not the ConfigMap's {key}"
    );
    let text = ex.object("ConfigMap", config_map)["data"][key]
        .as_str()
        .expect("the policy is in the ConfigMap");
    (policy_file.to_path_buf(), text)
}

/// `file` is on a volume of `container`: a key of its Secret or ConfigMap, or on a claim.
fn on_a_volume(ex: &Example, pod: &Value, container: &Value, file: &Path) {
    let (mount, inside) = mount_of(container, file);
    let v = volume(pod, mount["name"].as_str().unwrap());
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
        assert!(
            v["persistentVolumeClaim"].is_object() || v["emptyDir"].is_object(),
            "{}",
            file.display()
        );
    }
}

/// The Deployment, Service and probes of `ex` agree with the policy its proxy serves, and
/// every file in `files` (besides those every policy names) is on a volume.
fn agrees_with(ex: &Example, policy: &Policy, mut files: Vec<PathBuf>) {
    let (pod, container) = proxy_pod(ex);

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
    files.extend([
        policy.log.signing_key.clone().unwrap(),
        policy.admin.token_file.clone().unwrap(),
        policy.geo_database.clone().unwrap(),
    ]);
    if let Some(tls) = &policy.tls {
        files.extend([tls.cert.clone(), tls.key.clone()]);
        files.extend(tls.client_ca.clone());
    }
    if let ConsentStore::File(p) = &policy.consent.store {
        files.push(p.clone());
    }
    for f in &files {
        on_a_volume(ex, pod, container, f);
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

#[test]
fn the_kubernetes_example_agrees_with_its_policy() {
    let ex = Example::load();
    let (_, text) = served_policy(&ex, "residency-proxy-policy", "policy.toml");
    let policy: Policy = residency_proxy::policy::compile::from_str("policy.toml", text)
        .unwrap_or_else(|e| panic!("the ConfigMap's policy does not compile: {e}"));
    agrees_with(&ex, &policy, Vec::new());
}

/// The bundle policy that `policy-publish.yaml` builds, and the path it is built from.
fn published_rules(publish: &Example) -> (String, &str) {
    let text = publish.object("ConfigMap", "residency-proxy-bundle-policy")["data"]["policy.toml"]
        .as_str()
        .expect("the bundle's policy is in the ConfigMap");
    ("policy.toml".to_string(), text)
}

#[test]
fn the_bundle_sidecar_compiles_with_the_published_bundle_and_agrees_with_it() {
    use residency_proxy::policy::compile::{BundleRules, PolicyFile, load_file, merge};
    use residency_proxy::policy::model::SourceUrl;
    let ex = Example::from("kubernetes/residency-proxy-bundle.yaml");
    let publish = Example::from("kubernetes/policy-publish.yaml");
    // No policy ConfigMap: the rules come from the bundle.
    assert!(
        !ex.docs
            .iter()
            .any(|d| d["metadata"]["name"] == "residency-proxy-policy"),
        "the bundle variant still ships the policy ConfigMap"
    );
    let (path, text) = served_policy(&ex, "residency-proxy-sidecar", "sidecar.toml");
    let owned = text.to_string();
    let file = load_file(&path, move |_| Ok(owned.clone()))
        .unwrap_or_else(|e| panic!("the sidecar's file does not compile: {e}"));
    let PolicyFile::Sidecar(sidecar) = file else {
        panic!("the sidecar's file has no [policy.source]");
    };
    let (entry, rules) = published_rules(&publish);
    // As a sidecar merges a verified bundle: the database it carries unpacked beside the
    // kept bundle.
    let geo = residency_proxy::bundle::keep::geo_dir(&sidecar.source.cache)
        .join("geo-0123456789abcdef.mmdb");
    let files = [(entry.clone(), rules.to_string())];
    let policy = merge(
        &sidecar,
        &BundleRules {
            label: Path::new("s3://policies/storage-frankfurt.bundle"),
            entry: &entry,
            files: &files,
            geo_database: Some(&geo),
            revision: 1,
        },
    )
    .unwrap_or_else(|e| panic!("the sidecar's file does not compile with the bundle: {e}"));
    agrees_with(
        &ex,
        &policy,
        vec![sidecar.source.key.clone(), sidecar.source.cache.clone()],
    );

    // The kept bundle and its database are written: their volume is not read-only.
    let (_, container) = proxy_pod(&ex);
    for written in [&sidecar.source.cache, &geo] {
        let (mount, _) = mount_of(container, written);
        assert_ne!(
            mount["readOnly"],
            true,
            "{} is read-only",
            written.display()
        );
    }
    // The key the sidecars trust is the one the publishing job verifies with.
    let key = |e: &Example| e.object("ConfigMap", "residency-proxy-policy-key")["data"].clone();
    assert_eq!(key(&ex), key(&publish));
    // The store's credentials come from a Secret, not the manifest.
    let from = &container["envFrom"][0]["secretRef"]["name"];
    let secret = ex.object("Secret", from.as_str().expect("credentials from a Secret"));
    assert!(secret["stringData"]["AWS_ACCESS_KEY_ID"].is_string());

    // Where the job uploads is where the sidecars poll.
    let SourceUrl::S3(url) = &sidecar.source.url else {
        panic!("the example polls object storage");
    };
    let upload = publish_steps(&publish).upload;
    assert_eq!(upload.target, url.as_str());
    assert_eq!(
        Some(upload.endpoint.as_str()),
        sidecar
            .source
            .endpoint
            .as_ref()
            .map(|e| e.as_str().trim_end_matches('/'))
    );
}

/// What the publishing job runs, in order.
struct Steps<'a> {
    /// Each residency-proxy step: its container and arguments.
    proxy: Vec<(&'a Value, Vec<&'a str>)>,
    upload: Upload,
}

/// `aws s3 cp FILE s3://… --endpoint-url URL`.
struct Upload {
    file: String,
    target: String,
    endpoint: String,
}

fn publish_steps(publish: &Example) -> Steps<'_> {
    let job = publish.of_kind("CronJob");
    let pod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let proxy = pod["initContainers"]
        .as_array()
        .expect("the steps are init containers: each runs once the one before succeeded")
        .iter()
        .map(|c| (c, strings(&c["args"])))
        .collect();
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(
        containers.len(),
        1,
        "one container, the upload, after the steps"
    );
    let args = strings(&containers[0]["args"]);
    assert_eq!(args[..2], ["s3", "cp"], "{args:?}");
    Steps {
        proxy,
        upload: Upload {
            file: args[2].to_string(),
            target: args[3].to_string(),
            endpoint: flag(&args, "--endpoint-url").to_string(),
        },
    }
}

/// The command line parses with the real command's flags.
fn parses(args: &[&str]) {
    use clap::Parser;
    residency_proxy::cli::Cli::try_parse_from(
        std::iter::once("residency-proxy").chain(args.iter().copied()),
    )
    .unwrap_or_else(|e| panic!("`residency-proxy {}` does not parse:\n{e}", args.join(" ")));
}

#[test]
fn the_publishing_job_updates_the_database_weekly_then_builds_verifies_and_uploads() {
    let publish = Example::from("kubernetes/policy-publish.yaml");
    let job = publish.of_kind("CronJob");
    // Weekly: any minute and hour, every day of the month and month, one day of the week.
    let schedule: Vec<&str> = job["spec"]["schedule"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!(schedule.len(), 5, "{schedule:?}");
    assert_eq!(schedule[2..4], ["*", "*"], "{schedule:?}");
    assert!(
        schedule[4].parse::<u8>().is_ok_and(|d| d < 7),
        "{schedule:?}"
    );
    assert_eq!(job["spec"]["concurrencyPolicy"], "Forbid");
    let pod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_ne!(pod["restartPolicy"], "Always");

    let steps = publish_steps(&publish);
    let commands: Vec<String> = steps.proxy.iter().map(|(_, a)| a[..2].join(" ")).collect();
    assert_eq!(commands, ["geo update", "bundle build", "bundle verify"]);
    for (container, args) in &steps.proxy {
        parses(args);
        assert_eq!(
            container["image"],
            proxy_pod(&Example::load()).1["image"],
            "the steps run the proxy's own image"
        );
    }
    let on_volume = |container: &Value, file: &str| {
        on_a_volume(&publish, pod, container, Path::new(file));
        mount_of(container, Path::new(file)).0.clone()
    };

    // geo update: the database on the claim kept between runs (an older download is refused
    // against it), the licence key from a Secret, never on the command line.
    let (update, args) = &steps.proxy[0];
    let database = flag(args, "--out");
    let mount = on_volume(update, database);
    assert_ne!(
        mount["readOnly"], true,
        "geo update cannot write {database}"
    );
    assert!(
        volume(pod, mount["name"].as_str().unwrap())["persistentVolumeClaim"].is_object(),
        "the database is not kept between runs"
    );
    assert!(flag(args, "--source").starts_with("https://"));
    assert!(
        !args.contains(&"--license-key"),
        "the licence key is in the manifest"
    );
    let env: Vec<&str> = update["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_object())
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(env, ["GEOIPUPDATE_ACCOUNT_ID", "GEOIPUPDATE_LICENSE_KEY"]);

    // bundle build: the reviewed policy compiles as a bundle's, with that database.
    let (build, args) = &steps.proxy[1];
    assert_eq!(flag(args, "--geo"), database);
    on_volume(build, database);
    let policy_file = args[2];
    on_volume(build, policy_file);
    let (_, rules) = published_rules(&publish);
    let owned = rules.to_string();
    let compiled =
        residency_proxy::policy::compile::load_rules(Path::new(policy_file), move |_| {
            Ok(owned.clone())
        })
        .unwrap_or_else(|e| panic!("the bundle's policy does not compile: {e}"));
    assert!(
        compiled.geo_database.is_some(),
        "--geo needs the policy to name a [geo] database"
    );
    on_volume(build, flag(args, "--signing-key"));
    let bundle = flag(args, "-o");
    let mount = on_volume(build, bundle);
    assert_ne!(
        mount["readOnly"], true,
        "bundle build cannot write {bundle}"
    );

    // bundle verify: that very file, with the key the sidecars hold.
    let (verify, args) = &steps.proxy[2];
    assert_eq!(args[2], bundle);
    on_volume(verify, bundle);
    on_volume(verify, flag(args, "--key"));

    // The upload: that file, to object storage.
    assert_eq!(steps.upload.file, bundle);
    let upload = &pod["containers"][0];
    on_volume(upload, bundle);
    assert!(steps.upload.target.starts_with("s3://"));
}

#[test]
fn the_systemd_timer_runs_the_same_steps_weekly() {
    let systemd = deploy().join("systemd");
    let timer = std::fs::read_to_string(systemd.join("residency-proxy-publish.timer")).unwrap();
    let service = std::fs::read_to_string(systemd.join("residency-proxy-publish.service")).unwrap();
    let values = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    let calendar = values(&timer, "OnCalendar");
    assert_eq!(calendar.len(), 1);
    assert!(
        calendar[0] == "weekly"
            || ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
                .iter()
                .any(|d| calendar[0].starts_with(&format!("{d} "))),
        "not weekly: {calendar:?}"
    );
    assert_eq!(values(&timer, "Persistent"), ["true"]);
    assert_eq!(values(&timer, "Unit"), ["residency-proxy-publish.service"]);
    assert_eq!(
        values(&service, "Type"),
        ["oneshot"],
        "the steps run one after the other"
    );

    let steps: Vec<Vec<String>> = values(&service, "ExecStart")
        .iter()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let proxy: Vec<Vec<&str>> = steps
        .iter()
        .filter(|s| s[0].ends_with("/residency-proxy"))
        .map(|s| s[1..].iter().map(String::as_str).collect())
        .collect();
    let commands: Vec<String> = proxy.iter().map(|a| a[..2].join(" ")).collect();
    assert_eq!(commands, ["geo update", "bundle build", "bundle verify"]);
    for args in &proxy {
        parses(args);
    }
    let database = flag(&proxy[0], "--out");
    assert_eq!(flag(&proxy[1], "--geo"), database);
    let bundle = flag(&proxy[1], "-o");
    assert_eq!(proxy[2][2], bundle);
    let upload = steps.last().unwrap();
    assert!(upload[0].ends_with("/aws"), "{upload:?}");
    assert_eq!(upload[1..4], ["s3", "cp", bundle]);
    // The licence key is in the environment file, not the unit.
    assert!(!service.contains("--license-key"));
    assert_eq!(values(&service, "EnvironmentFile").len(), 1);
    // geo update writes its database where the service may write.
    let state = values(&service, "StateDirectory");
    assert!(
        database.starts_with(&format!("/var/lib/{}/", state[0])),
        "{database} is not in the StateDirectory"
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
