//! The dashboards and rules of `dashboards/` against a real fleet: a control
//! plane over TLS with four tills in two stores, one rollout that completes
//! and one that pauses on failures and is rolled back, scraped every second
//! by Debian's `prometheus` with the rules loaded. Every expression of the
//! dashboards and rules must run, every panel, annotation and variable query
//! must return series, every rule group must evaluate without error, and
//! `promtool check metrics` must accept the control plane's `/metrics`.
//!
//! Needs the `prometheus` and `promtool` binaries (Debian's `prometheus`
//! package), so it is ignored by `cargo test`; `.ci/run` installs the
//! package and runs it:
//! `cargo test -p posfleet-e2e --test prometheus_live -- --ignored`.

use posfleet_e2e::dashboards::{self, Source, dashboard_queries, for_prometheus, rule_queries};
use posfleet_e2e::fleet::{Fleet, TIMEOUT};
use posfleet_e2e::prometheus::{Prometheus, free_address, promtool_binary, scrape};
use posfleet_e2e::{ControlPlane, check_ok, eventually};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const STORES: [&str; 2] = ["lyon-01", "nice-01"];
const JOB: &str = "posfleet-control-plane";
/// What Grafana's `$__rate_interval` and `$__interval` become here.
const RATE_INTERVAL: &str = "1m";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Scrapes `cp` over https every second, trusting its fleet CA; evaluates
/// the dashboards' rules every second.
fn config(cp: &ControlPlane) -> String {
    let rules = dashboards::dir().join("rules");
    let rules = rules.canonicalize().unwrap_or(rules);
    format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - "{rules}/*.yml"
scrape_configs:
  - job_name: {JOB}
    scheme: https
    tls_config:
      ca_file: "{ca}"
    static_configs:
      - targets: ["{target}"]
"#,
        rules = rules.display(),
        ca = cp.ca_file().display(),
        target = cp.http_address,
    )
}

/// `posfleet rollout create ARGS --start`; returns the rollout's id.
fn rollout(fleet: &Fleet, args: &str) -> String {
    let mut all = vec!["rollout", "create"];
    all.extend(args.split_whitespace());
    all.push("--start");
    let created = fleet.cp.cli_json(&all);
    created["id"].as_str().expect("rollout id").to_string()
}

fn wait_for_state(fleet: &Fleet, id: &str, state: &str) {
    eventually(&format!("rollout {id} {state}"), TIMEOUT, || {
        (fleet.cp.cli_json(&["rollout", "show", id])["state"] == state).then_some(())
    });
}

/// Waits until an instant query's first sample is `value`.
fn wait_for_value(prometheus: &Prometheus, query: &str, value: f64) {
    eventually(
        &format!("Prometheus: {query} = {value}"),
        Duration::from_secs(60),
        || (prometheus.scalar(query) == Some(value)).then_some(()),
    );
}

#[test]
#[ignore = "needs Debian's prometheus package; .ci/run installs it and runs this"]
fn every_dashboard_and_rule_query_runs_against_a_live_fleet() {
    let start = unix_now();
    let mut fleet = Fleet::builder()
        .control_plane_args(&["--tls-server-name", "127.0.0.1"])
        .start();
    assert!(fleet.cp.tls);
    let prometheus = Prometheus::start(&config(&fleet.cp));
    wait_for_value(&prometheus, &format!(r#"up{{job="{JOB}"}}"#), 1.0);

    for store in STORES {
        fleet.store(store, 2, &[]);
    }
    for (version, healthy) in [("1.0.0", true), ("1.1.0", true), ("1.2.0", false)] {
        fleet.publish(version, healthy, 0);
    }
    for store in STORES {
        fleet.assign(store, "pos-app@1.0.0");
    }
    fleet.wait_until_active(&STORES, "1.0.0");

    // A webhook whose receiver is not there: deliveries wait and fail.
    let nobody = free_address();
    check_ok(fleet.cp.cli(&[
        "webhook",
        "add",
        &format!("http://{nobody}/posfleet"),
        "--events",
        "rollout.*",
    ]));
    // A caller's mistake: a device that does not exist (NOT_FOUND).
    assert!(
        !fleet
            .cp
            .cli(&["device", "show", "dev-nobody"])
            .status
            .success()
    );

    let good = rollout(&fleet, "--release pos-app@1.1.0 --waves 1,100% --bake 1s");
    wait_for_state(&fleet, &good, "completed");
    fleet.wait_until_active(&STORES, "1.1.0");

    // A release whose health check fails: its canary store fails, the
    // rollout pauses itself; Prometheus sees it paused (a rollout's own
    // series exist only while it is running or paused), then it is rolled
    // back.
    let bad = rollout(
        &fleet,
        "--release pos-app@1.2.0 --canary-stores lyon-01 --waves 100% \
         --max-failures 20% --min-failures 1",
    );
    wait_for_state(&fleet, &bad, "paused");
    wait_for_value(
        &prometheus,
        &format!(r#"max(posfleet_rollout_state{{rollout="{bad}", state="paused"}})"#),
        1.0,
    );
    // A few rule evaluations with the paused rollout in them.
    std::thread::sleep(Duration::from_secs(5));
    check_ok(
        fleet
            .cp
            .cli(&["rollout", "rollback", &bad, "--reason", "health check"]),
    );
    wait_for_state(&fleet, &bad, "rolled_back");
    wait_for_value(
        &prometheus,
        r#"max(posfleet_rollouts{state="rolled_back"})"#,
        1.0,
    );
    std::thread::sleep(Duration::from_secs(3));

    let end = unix_now();
    let range = format!("{}s", (end - start).ceil() as u64);
    let (start, end) = (format!("{start:.3}"), format!("{end:.3}"));
    let mut failures = Vec::new();
    for query in dashboard_queries() {
        let expr = for_prometheus(&query.expr, RATE_INTERVAL, &range);
        // As Grafana asks: over the time range, a point a second.
        let answer = prometheus.api(
            "query_range",
            &[
                ("query", &expr),
                ("start", &start),
                ("end", &end),
                ("step", "1"),
            ],
        );
        match answer {
            Err(error) => failures.push(format!("{query}\n      does not run: {error}")),
            Ok(data) if data["result"].as_array().is_none_or(Vec::is_empty) => {
                failures.push(format!("{query}\n      returns no series ({expr})"))
            }
            Ok(_) => {}
        }
    }
    for query in rule_queries() {
        if let Err(error) = prometheus.api("query", &[("query", &query.expr)]) {
            failures.push(format!("{query}\n      does not run: {error}"));
        }
    }
    // Rules Prometheus loaded and how their last evaluation went: an
    // expression can parse and still fail on the data (duplicate series in
    // a match, say).
    let loaded = prometheus.api("rules", &[]).expect("GET /api/v1/rules");
    let mut rules_loaded = 0;
    for group in loaded["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            rules_loaded += 1;
            if rule["health"] != "ok" {
                failures.push(format!(
                    "rule {} of group {}: health {} {}",
                    rule["name"], group["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    let rules = rule_queries();
    assert_eq!(
        rules_loaded,
        rules.len(),
        "Prometheus loaded {rules_loaded} rules of {}",
        rules.len()
    );
    assert!(
        dashboard_queries()
            .iter()
            .any(|q| q.source == Source::Annotation),
        "no annotation query was tried"
    );
    assert!(
        failures.is_empty(),
        "{} of the dashboards' and rules' queries failed against the live fleet:\n  {}\nPrometheus's warnings and errors:\n{}",
        failures.len(),
        failures.join("\n  "),
        prometheus
            .process
            .lines()
            .into_iter()
            .filter(|l| l.contains("level=warn") || l.contains("level=error"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    check_metrics(&scrape(&fleet.cp));
}

/// Lint findings `promtool check metrics` may report: the heartbeat age
/// gauge carries its quantiles as a `quantile` label by design (it is
/// computed from the database at a scrape, not observed as a summary).
const ACCEPTED_LINTS: [&str; 1] = [
    r#"posfleet_device_heartbeat_age_seconds non-summary metrics should not have "quantile" label"#,
];

/// `promtool check metrics` on a scrape: no parse error, and no lint
/// finding but the accepted ones.
fn check_metrics(body: &str) {
    assert!(
        body.contains("posfleet_build_info"),
        "not a posfleet scrape:\n{body}"
    );
    let mut child = Command::new(promtool_binary())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(body.as_bytes())
        .expect("write the scrape to promtool");
    let output = child.wait_with_output().expect("promtool's answer");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // 0: clean; 3: lint findings only (listed one a line); else an error.
    match output.status.code() {
        Some(0) => {}
        Some(3) => {
            let unexpected: Vec<&str> = said
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !ACCEPTED_LINTS.contains(l))
                .collect();
            assert!(
                unexpected.is_empty(),
                "promtool check metrics found:\n{}",
                unexpected.join("\n")
            );
        }
        _ => panic!("promtool check metrics failed ({}):\n{said}", output.status),
    }
}
