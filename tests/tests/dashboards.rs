//! The structure of `dashboards/`: what makes a Grafana dashboard usable
//! in any Grafana pointed at any Prometheus (the data source chosen by a
//! variable, units and descriptions, relative time, rates over
//! `$__rate_interval`), and what makes each alert actionable (a severity, a
//! summary, a description, a runbook in the README, promtool tests of it
//! firing and not firing). Each check lists every offender at once.

use posfleet_e2e::dashboards::{
    self, Dashboard, Source, dashboard_queries, dashboards, is_row, metric_names, range_selectors,
    rule_files, rule_queries, test_files,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const DATASOURCE: &str = "${datasource}";

fn check(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("(untitled)")
}

/// Each query panel of each dashboard, with the dashboard.
fn query_panels(all: &[Dashboard]) -> Vec<(&Dashboard, &Value)> {
    all.iter()
        .flat_map(|d| d.panels().into_iter().map(move |p| (d, p)))
        .filter(|(_, p)| !is_row(p))
        .collect()
}

#[test]
fn there_are_the_four_dashboards() {
    let files: Vec<String> = dashboards().into_iter().map(|d| d.file).collect();
    assert_eq!(
        files,
        [
            "grafana/control-plane.json",
            "grafana/distribution.json",
            "grafana/fleet-overview.json",
            "grafana/rollouts.json"
        ]
    );
}

#[test]
fn dashboards_have_unique_uids_a_current_schema_and_relative_time() {
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for d in dashboards() {
        let uid = d.json["uid"].as_str().unwrap_or_default();
        if uid.is_empty() || !uids.insert(uid.to_string()) {
            problems.push(format!("{}: uid `{uid}` missing or used twice", d.file));
        }
        if d.json["schemaVersion"].as_u64().unwrap_or(0) < 39 {
            problems.push(format!("{}: schemaVersion under 39", d.file));
        }
        if d.json["title"].as_str().unwrap_or_default().is_empty() {
            problems.push(format!("{}: no title", d.file));
        }
        for end in ["from", "to"] {
            let at = d.json["time"][end].as_str().unwrap_or_default();
            if !at.starts_with("now") {
                problems.push(format!(
                    "{}: time.{end} `{at}` is not relative to now",
                    d.file
                ));
            }
        }
        for panel in d.panels() {
            // A panel's own time range is a relative span ("1h"), never a date.
            for key in ["timeFrom", "timeShift"] {
                if let Some(span) = panel[key].as_str()
                    && !span
                        .trim_start_matches("now-")
                        .ends_with(['s', 'm', 'h', 'd', 'w', 'M', 'y'])
                {
                    problems.push(format!("{} \"{}\": {key} `{span}`", d.file, title(panel)));
                }
            }
        }
    }
    check("dashboards", problems);
}

#[test]
fn panel_ids_are_unique_within_each_dashboard_rows_included() {
    let mut problems = Vec::new();
    for d in dashboards() {
        let mut seen = BTreeMap::new();
        for panel in d.panels() {
            match panel["id"].as_u64() {
                None => problems.push(format!("{} \"{}\": no id", d.file, title(panel))),
                Some(id) => {
                    if let Some(first) = seen.insert(id, title(panel).to_string()) {
                        problems.push(format!(
                            "{}: id {id} is both \"{first}\" and \"{}\"",
                            d.file,
                            title(panel)
                        ));
                    }
                }
            }
        }
    }
    check("panel ids", problems);
}

#[test]
fn every_query_uses_the_datasource_variable() {
    let mut problems = Vec::new();
    let all = dashboards();
    for d in &all {
        let variable = d
            .variables()
            .into_iter()
            .find(|v| v["name"] == "datasource");
        match variable {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            _ => problems.push(format!(
                "{}: no `datasource` variable of type datasource and query prometheus",
                d.file
            )),
        }
        for v in d.variables().into_iter().filter(|v| v["type"] == "query") {
            if v["datasource"]["uid"] != DATASOURCE {
                problems.push(format!("{} variable {}: datasource", d.file, v["name"]));
            }
        }
        for a in d.annotations() {
            if a["datasource"]["uid"] != DATASOURCE {
                problems.push(format!("{} annotation {}: datasource", d.file, a["name"]));
            }
        }
    }
    for (d, panel) in query_panels(&all) {
        if panel["datasource"]["uid"] != DATASOURCE || panel["datasource"]["type"] != "prometheus" {
            problems.push(format!("{} \"{}\": panel datasource", d.file, title(panel)));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{} \"{}\": no query", d.file, title(panel)));
        }
        for target in targets {
            // A target without a datasource inherits the panel's.
            if !target["datasource"].is_null() && target["datasource"]["uid"] != DATASOURCE {
                problems.push(format!(
                    "{} \"{}\": target datasource",
                    d.file,
                    title(panel)
                ));
            }
        }
    }
    // No data source uid anywhere but the variable (and Grafana's own, for
    // its built-in annotations).
    for d in &all {
        let text = d.json.to_string();
        for part in text.split("\"uid\":").skip(1) {
            let value = part.split(['}', ',']).next().unwrap_or_default();
            if let Ok(uid) = serde_json::from_str::<String>(value)
                && uid != DATASOURCE
                && uid != "-- Grafana --"
                && uid != d.json["uid"]
            {
                problems.push(format!("{}: hard-coded uid `{uid}`", d.file));
            }
        }
    }
    check("data sources", problems);
}

#[test]
fn every_panel_has_a_unit_and_a_description() {
    let mut problems = Vec::new();
    let all = dashboards();
    for (d, panel) in query_panels(&all) {
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{} \"{}\": no unit", d.file, title(panel)));
        }
        if panel["description"]
            .as_str()
            .is_none_or(|s| s.trim().is_empty())
        {
            problems.push(format!("{} \"{}\": no description", d.file, title(panel)));
        }
    }
    check("panels", problems);
}

#[test]
fn dashboard_ranges_are_rate_interval_or_the_time_range() {
    let problems = dashboard_queries()
        .into_iter()
        .filter(|q| {
            range_selectors(&q.expr)
                .iter()
                .any(|r| r != "$__rate_interval" && r != "$__range")
        })
        .map(|q| q.to_string())
        .collect();
    check(
        "ranges other than [$__rate_interval] or [$__range] (fixed windows belong in recording rules)",
        problems,
    );
}

#[test]
fn every_recorded_name_a_dashboard_reads_is_recorded() {
    let recorded: BTreeSet<String> = rule_files()
        .into_iter()
        .flat_map(|(_, f)| f.groups)
        .flat_map(|g| g.rules)
        .filter_map(|r| r.record)
        .collect();
    let problems = dashboard_queries()
        .into_iter()
        .chain(rule_queries())
        .flat_map(|q| {
            metric_names(&q.expr)
                .into_iter()
                .filter(|name| name.contains(':') && !recorded.contains(name))
                .map(move |name| format!("{q}: `{name}` is recorded by no rule"))
        })
        .collect();
    check("recorded names", problems);
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook() {
    let readme =
        std::fs::read_to_string(dashboards::dir().join("README.md")).expect("dashboards/README.md");
    let headings: BTreeSet<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(str::trim)
        .collect();
    let mut problems = Vec::new();
    let mut alerts = 0;
    for (file, rules) in rule_files() {
        for rule in rules.groups.iter().flat_map(|g| &g.rules) {
            let Some(alert) = &rule.alert else { continue };
            alerts += 1;
            let at = format!("{file} {alert}");
            let severity = rule.labels.get("severity").map(String::as_str);
            if !matches!(severity, Some("critical" | "warning" | "info")) {
                problems.push(format!("{at}: severity {severity:?}"));
            }
            for key in ["summary", "description"] {
                if rule
                    .annotations
                    .get(key)
                    .is_none_or(|s| s.trim().is_empty())
                {
                    problems.push(format!("{at}: no {key}"));
                }
            }
            let want = format!("dashboards/README.md#{}", alert.to_lowercase());
            if rule.annotations.get("runbook_url") != Some(&want) {
                problems.push(format!("{at}: runbook_url is not `{want}`"));
            }
            if !headings.contains(alert.as_str()) {
                problems.push(format!(
                    "{at}: no `### {alert}` runbook in dashboards/README.md"
                ));
            }
        }
    }
    assert!(alerts > 0, "no alerts in dashboards/rules");
    check("alerts", problems);
}

#[test]
fn every_alert_has_promtool_tests_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for (_, file) in test_files() {
        for case in file.tests.iter().flat_map(|t| &t.alert_rule_test) {
            if case.exp_alerts.is_empty() {
                silent.insert(case.alertname.clone());
            } else {
                firing.insert(case.alertname.clone());
            }
        }
    }
    let mut problems = Vec::new();
    for query in rule_queries()
        .into_iter()
        .filter(|q| q.source == Source::Alert)
    {
        if !firing.contains(&query.title) {
            problems.push(format!("{}: no test where it fires", query.title));
        }
        if !silent.contains(&query.title) {
            problems.push(format!(
                "{}: no test where it does not fire (exp_alerts empty)",
                query.title
            ));
        }
    }
    // A test of an alert that no longer exists tests nothing.
    let alerts: BTreeSet<String> = rule_queries()
        .into_iter()
        .filter(|q| q.source == Source::Alert)
        .map(|q| q.title)
        .collect();
    for name in firing.union(&silent) {
        if !alerts.contains(name) {
            problems.push(format!("{name}: tested, but no such alert"));
        }
    }
    check("promtool tests", problems);
}

#[test]
fn every_dashboard_query_is_found() {
    // Every panel's queries, annotations and variables make it to the live
    // test: a count per dashboard that a broken extraction would change.
    let queries = dashboard_queries();
    for d in dashboards() {
        let targets: usize = d
            .panels()
            .iter()
            .map(|p| p["targets"].as_array().map_or(0, Vec::len))
            .sum();
        let found = queries
            .iter()
            .filter(|q| q.file == d.file && q.source == Source::Panel)
            .count();
        assert_eq!(found, targets, "{}", d.file);
        assert!(found > 0, "{}: no panel query", d.file);
        let variables = queries
            .iter()
            .filter(|q| q.file == d.file && q.source == Source::Variable)
            .count();
        assert_eq!(
            variables,
            d.variables()
                .iter()
                .filter(|v| v["type"] == "query")
                .count(),
            "{}: a query variable whose series was not found",
            d.file
        );
    }
}
