//! The `dashboards/` folder read as its checks need it: the Grafana
//! dashboards, the Prometheus rules and their promtool tests, and every
//! PromQL expression they hold (for `tests/tests/dashboards.rs`, which
//! checks their structure, and `tests/tests/prometheus_live.rs`, which runs
//! them against a Prometheus scraping a real fleet).

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository's `dashboards/` folder.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// The files of `dir()/sub` whose names end with `suffix`, sorted.
fn files(sub: &str, suffix: &str) -> Vec<PathBuf> {
    let folder = dir().join(sub);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", folder.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no *{suffix} in {}", folder.display());
    found
}

fn name(path: &Path) -> String {
    let parent = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{parent}/{}",
        path.file_name().unwrap_or_default().to_string_lossy()
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A Grafana dashboard of `dashboards/grafana/`.
pub struct Dashboard {
    /// `grafana/NAME.json`.
    pub file: String,
    pub json: Value,
}

/// Every dashboard, by file name.
pub fn dashboards() -> Vec<Dashboard> {
    files("grafana", ".json")
        .into_iter()
        .map(|path| Dashboard {
            file: name(&path),
            json: serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", name(&path))),
        })
        .collect()
}

fn list<'a>(value: &'a Value, pointer: &str) -> Vec<&'a Value> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|items| items.iter().collect())
        .unwrap_or_default()
}

impl Dashboard {
    /// Every panel, rows and the panels inside collapsed rows included.
    pub fn panels(&self) -> Vec<&Value> {
        let mut all = Vec::new();
        for panel in list(&self.json, "/panels") {
            all.push(panel);
            all.extend(list(panel, "/panels"));
        }
        all
    }

    /// The template variables.
    pub fn variables(&self) -> Vec<&Value> {
        list(&self.json, "/templating/list")
    }

    /// The annotation queries, Grafana's built-in one left out.
    pub fn annotations(&self) -> Vec<&Value> {
        list(&self.json, "/annotations/list")
            .into_iter()
            .filter(|a| a.get("builtIn").and_then(Value::as_u64) != Some(1))
            .collect()
    }
}

/// Whether a panel is a row (which holds panels and queries nothing).
pub fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

/// Where an expression comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A panel's query.
    Panel,
    /// A dashboard's annotation query.
    Annotation,
    /// A template variable's query, as the series it lists labels of.
    Variable,
    /// A recording rule.
    Recording,
    /// An alerting rule.
    Alert,
}

/// A PromQL expression and where it was found.
#[derive(Debug, Clone)]
pub struct Query {
    /// `grafana/NAME.json` or `rules/NAME.yml`.
    pub file: String,
    /// The panel's, annotation's or variable's title, or the rule's name.
    pub title: String,
    pub source: Source,
    pub expr: String,
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} \"{}\": {}",
            self.file, self.source, self.title, self.expr
        )
    }
}

/// Every expression of the dashboards: panels' targets, annotation queries
/// and template variables (their `label_values(...)` or `query_result(...)`
/// series).
pub fn dashboard_queries() -> Vec<Query> {
    let mut queries = Vec::new();
    for dashboard in dashboards() {
        let query = |title: &Value, source, expr: &str| Query {
            file: dashboard.file.clone(),
            title: title.as_str().unwrap_or_default().to_string(),
            source,
            expr: expr.to_string(),
        };
        for panel in dashboard.panels() {
            for target in list(panel, "/targets") {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(query(&panel["title"], Source::Panel, expr));
                }
            }
        }
        for annotation in dashboard.annotations() {
            let expr = annotation["expr"]
                .as_str()
                .or_else(|| annotation["target"]["expr"].as_str());
            if let Some(expr) = expr {
                queries.push(query(&annotation["name"], Source::Annotation, expr));
            }
        }
        for variable in dashboard.variables() {
            if let Some(expr) = variable_expr(variable) {
                queries.push(query(&variable["name"], Source::Variable, &expr));
            }
        }
    }
    queries
}

/// The series a Prometheus query variable reads: `EXPR` of
/// `label_values(EXPR, label)` or `query_result(EXPR)`; `None` for other
/// variables and for queries that name no series (`label_values(label)`,
/// `label_names()`, `metrics(...)`).
pub fn variable_expr(variable: &Value) -> Option<String> {
    if variable["type"] != "query" {
        return None;
    }
    let query = variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())?
        .trim();
    if let Some(inner) = call_argument(query, "query_result") {
        return Some(inner.to_string());
    }
    let inner = call_argument(query, "label_values")?;
    // The label is the last argument; a selector may hold commas itself.
    let (series, _label) = inner.rsplit_once(',')?;
    Some(series.trim().to_string())
}

/// `ARG` of `function(ARG)`.
fn call_argument<'a>(text: &'a str, function: &str) -> Option<&'a str> {
    text.strip_prefix(function)?
        .trim_start()
        .strip_prefix('(')?
        .strip_suffix(')')
}

/// A Prometheus rule file of `dashboards/rules/`.
#[derive(Debug, Deserialize)]
pub struct RuleFile {
    pub groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
pub struct Rule {
    pub alert: Option<String>,
    pub record: Option<String>,
    pub expr: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Rule {
    pub fn name(&self) -> &str {
        self.alert
            .as_deref()
            .or(self.record.as_deref())
            .unwrap_or_default()
    }
}

/// Every rule file, by file name.
pub fn rule_files() -> Vec<(String, RuleFile)> {
    yaml_files("rules", ".yml", "a rule file")
}

/// The YAML files of `dir()/sub` named `*suffix`, parsed as `what`.
fn yaml_files<T: serde::de::DeserializeOwned>(
    sub: &str,
    suffix: &str,
    what: &str,
) -> Vec<(String, T)> {
    files(sub, suffix)
        .into_iter()
        .map(|path| {
            let parsed = serde_yaml_ng::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{}: not {what}: {e}", name(&path)));
            (name(&path), parsed)
        })
        .collect()
}

/// Every rule's expression.
pub fn rule_queries() -> Vec<Query> {
    let mut queries = Vec::new();
    for (file, rules) in rule_files() {
        for rule in rules.groups.iter().flat_map(|g| &g.rules) {
            queries.push(Query {
                file: file.clone(),
                title: rule.name().to_string(),
                source: if rule.alert.is_some() {
                    Source::Alert
                } else {
                    Source::Recording
                },
                expr: rule.expr.clone(),
            });
        }
    }
    queries
}

/// A promtool unit test file of `dashboards/tests/`.
#[derive(Debug, Deserialize)]
pub struct TestFile {
    pub tests: Vec<TestGroup>,
}

#[derive(Debug, Deserialize)]
pub struct TestGroup {
    #[serde(default)]
    pub alert_rule_test: Vec<AlertTest>,
}

#[derive(Debug, Deserialize)]
pub struct AlertTest {
    pub alertname: String,
    /// The alerts expected at the evaluation time; empty: none fires.
    #[serde(default)]
    pub exp_alerts: Vec<serde_yaml_ng::Value>,
}

/// Every promtool test file, by file name.
pub fn test_files() -> Vec<(String, TestFile)> {
    yaml_files("tests", ".test.yml", "a promtool test file")
}

/// The parts of an expression outside its string literals, each string
/// replaced by `""`.
fn without_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// What stands between the brackets of each range selector or subquery
/// (`5m`, `$__rate_interval`, `30m:1m`).
pub fn range_selectors(expr: &str) -> Vec<String> {
    without_strings(expr)
        .split('[')
        .skip(1)
        .filter_map(|part| {
            part.split_once(']')
                .map(|(inside, _)| inside.trim().to_string())
        })
        .collect()
}

/// The metric names an expression reads (recorded names included), once
/// each, in order. Label names, functions, keywords and durations are left
/// out.
pub fn metric_names(expr: &str) -> Vec<String> {
    let text = without_strings(expr);
    let mut names: Vec<String> = Vec::new();
    let mut depth_braces = 0usize;
    let mut depth_brackets = 0usize;
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => depth_braces += 1,
            '}' => depth_braces = depth_braces.saturating_sub(1),
            '[' => depth_brackets += 1,
            ']' => depth_brackets = depth_brackets.saturating_sub(1),
            _ => {}
        }
        let starts = c.is_ascii_alphabetic() || c == '_' || c == ':';
        let after_word = i > 0 && {
            let p = chars[i - 1];
            p.is_ascii_alphanumeric() || p == '_' || p == ':' || p == '$' || p == '.'
        };
        if !starts || after_word || depth_braces > 0 || depth_brackets > 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let next = chars[i..].iter().find(|c| !c.is_whitespace());
        // A function call, or the label list of by/without/on/ignoring/
        // group_left/group_right.
        let called = next == Some(&'(');
        let is_metric = word.starts_with("posfleet_")
            || word.starts_with("process_")
            || word == "up"
            || word.contains(':');
        if is_metric && !called && !names.contains(&word) {
            names.push(word);
        }
    }
    names
}

/// The expression as Prometheus can run it: Grafana's interval variables
/// replaced (`$__rate_interval` and `$__interval` by `rate_interval`,
/// `$__range` by `range`), every other variable (`$store`, `${rollout}`,
/// `${region:regex}`, `[[store]]`) by `.*`, which the dashboards only use in
/// `=~` matchers.
pub fn for_prometheus(expr: &str, rate_interval: &str, range: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let (name, used) = if let Some(inner) = tail.strip_prefix("[[") {
            match inner.split_once("]]") {
                Some((name, _)) => (name.to_string(), name.len() + 4),
                None => (String::new(), 0),
            }
        } else if let Some(inner) = tail.strip_prefix("${") {
            match inner.split_once('}') {
                Some((name, _)) => (
                    name.split(':').next().unwrap_or_default().to_string(),
                    name.len() + 3,
                ),
                None => (String::new(), 0),
            }
        } else if let Some(inner) = tail.strip_prefix('$') {
            let len = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            (inner[..len].to_string(), len + 1)
        } else {
            (String::new(), 0)
        };
        if used == 0 || name.is_empty() {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        }
        out.push_str(match name.as_str() {
            "__rate_interval" | "__interval" => rate_interval,
            "__range" => range,
            _ => ".*",
        });
        rest = &tail[used..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_variables_become_what_prometheus_runs() {
        for (expr, want) in [
            (
                r#"rate(x{store=~"$store"}[$__rate_interval])"#,
                r#"rate(x{store=~".*"}[1m])"#,
            ),
            (
                r#"increase(x{a=~"${region:regex}", b=~"[[rollout]]"}[$__range])"#,
                r#"increase(x{a=~".*", b=~".*"}[300s])"#,
            ),
            (r#"x{a=~"[0-9]+"}[${__interval}]"#, r#"x{a=~"[0-9]+"}[1m]"#),
            ("sum(x) * 2", "sum(x) * 2"),
        ] {
            assert_eq!(for_prometheus(expr, "1m", "300s"), want, "{expr}");
        }
    }

    #[test]
    fn range_selectors_skip_strings() {
        assert_eq!(
            range_selectors(r#"rate(x{a=~"[a-z]+"}[5m]) - y offset 1h + max_over_time(z[30m:1m])"#),
            ["5m", "30m:1m"]
        );
    }

    #[test]
    fn metric_names_leave_out_labels_functions_and_keywords() {
        assert_eq!(
            metric_names(
                r#"sum by (store, source) (rate(posfleet_a_total{store=~"x:y"}[5m])) / on (store) group_left (region) store:posfleet_b:ratio or vector(0)"#
            ),
            ["posfleet_a_total", "store:posfleet_b:ratio"]
        );
    }

    #[test]
    fn variable_queries_name_their_series() {
        let variable = |query: Value| serde_json::json!({"type": "query", "query": query});
        for (query, want) in [
            (
                serde_json::json!({"query": r#"label_values(m{a=~"$a", b="x,y"}, store)"#}),
                Some(r#"m{a=~"$a", b="x,y"}"#),
            ),
            (
                serde_json::json!("query_result(topk(5, m))"),
                Some("topk(5, m)"),
            ),
            (serde_json::json!("label_values(store)"), None),
        ] {
            assert_eq!(variable_expr(&variable(query)).as_deref(), want);
        }
    }
}
