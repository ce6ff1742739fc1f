//! The operations artefacts in conf/: the Grafana dashboard and the Prometheus alert
//! rules. They only refer to metrics the proxy exports (every name must be a string
//! literal in src/metrics.rs), the dashboard is well-formed JSON whose panels query
//! Prometheus, and every alert has an expression, a severity and annotations. No
//! proxy or Redis is started.

use std::collections::BTreeSet;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/grafana/tierproxy-dashboard.json"
);
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/prometheus/tierproxy-alerts.yml"
);
const METRICS_RS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs");

const PREFIX: &[u8] = b"tierproxy_";
/// Suffixes Prometheus adds to a histogram's name (`_bucket`, `_sum`, `_count`).
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Every metric name in `text`: `tierproxy_` followed by name characters, not preceded by
/// one, with a histogram suffix stripped. The name runs over upper-case letters too, so
/// `tierproxy_L1_bytes` is reported as such (and then not found) rather than skipped.
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let starts_here = b[i..].starts_with(PREFIX) && (i == 0 || !is_ident(b[i - 1]));
        if !starts_here {
            i += 1;
            continue;
        }
        let mut end = i + PREFIX.len();
        while end < b.len() && is_ident(b[end]) {
            end += 1;
        }
        if end > i + PREFIX.len() {
            // Only ASCII was consumed, so these are char boundaries.
            let mut name = &text[i..end];
            for suffix in HISTOGRAM_SUFFIXES {
                if let Some(stem) = name.strip_suffix(suffix) {
                    name = stem;
                    break;
                }
            }
            names.insert(name.to_string());
        }
        i = end;
    }
    names
}

/// The names in `text` that src/metrics.rs (given as `metrics_src`) does not define as a
/// string literal.
fn unknown_metrics(text: &str, metrics_src: &str) -> Vec<String> {
    metric_names(text)
        .into_iter()
        .filter(|n| !metrics_src.contains(&format!("\"{n}\"")))
        .collect()
}

fn check_known(path: &str) {
    let text = read(path);
    let metrics_src = read(METRICS_RS);
    let names = metric_names(&text);
    assert!(
        names.len() >= 5,
        "{path}: found only {names:?}: is the scanner broken?"
    );
    let unknown = unknown_metrics(&text, &metrics_src);
    assert!(
        unknown.is_empty(),
        "{path} refers to metrics that src/metrics.rs does not define: {unknown:?}"
    );
}

#[test]
fn metric_name_scanner() {
    let text = r#"sum(rate(tierproxy_l1_flushes_totl{job=~"$job"}[5m])) / my_tierproxy_thing
        + histogram_quantile(0.99, rate(tierproxy_spill_store_duration_seconds_bucket[5m]))
        tierproxy_spill_store_duration_seconds_count "tierproxy_L1_bytes" tierproxy_ tierproxy"#;
    let names: Vec<String> = metric_names(text).into_iter().collect();
    assert_eq!(
        names,
        [
            "tierproxy_L1_bytes",
            "tierproxy_l1_flushes_totl",
            "tierproxy_spill_store_duration_seconds",
        ]
    );
    // A misspelt name is caught, a right one (even as a histogram series) is not.
    let metrics_src = r#"pub const A: &str = "tierproxy_l1_flushes_total";
        pub const B: &str = "tierproxy_spill_store_duration_seconds";"#;
    assert_eq!(
        unknown_metrics(text, metrics_src),
        ["tierproxy_L1_bytes", "tierproxy_l1_flushes_totl"]
    );
    assert!(unknown_metrics(
        "rate(tierproxy_l1_flushes_total[5m]) tierproxy_spill_store_duration_seconds_sum",
        metrics_src
    )
    .is_empty());
}

#[test]
fn dashboard_metrics_exist() {
    check_known(DASHBOARD);
}

#[test]
fn alert_metrics_exist() {
    check_known(ALERTS);
}

/// The dashboard's panels, with those inside collapsed rows.
fn all_panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let top = dash["panels"]
        .as_array()
        .expect("the dashboard has a panels array");
    let mut out = Vec::new();
    for p in top {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[test]
fn dashboard_is_well_formed() {
    let text = read(DASHBOARD);
    let dash = serde_json::from_str::<serde_json::Value>(&text)
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));

    // A Prometheus data source variable, and the job/instance filters.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(var(name).expect(name)["type"], "query", "variable {name}");
    }

    let panels = all_panels(&dash);
    let mut ids = BTreeSet::new();
    let mut boxes = Vec::new();
    let mut exprs = 0;
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: panel id {id} is used twice");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{title}: gridPos {g}");
        boxes.push((title, x, y, w, h));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: the panel's data source is not the dashboard's variable"
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{title}: no targets"));
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{title}: a target without an expr"));
            let ref_id = t["refId"].as_str().expect("refId");
            assert!(ref_ids.insert(ref_id), "{title}: refId {ref_id} twice");
            check_filtered(title, expr);
            exprs += 1;
        }
    }
    assert!(exprs >= 20, "only {exprs} queries in the dashboard");

    // Panels must not overlap on the grid.
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let apart =
                a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1 || a.2 + a.4 <= b.2 || b.2 + b.4 <= a.2;
            assert!(apart, "panels {:?} and {:?} overlap", a.0, b.0);
        }
    }
}

/// Every tierproxy metric selected in a panel's query honours the job and instance
/// variables: `tierproxy_x{job=~"$job", instance=~"$instance", ...}`.
fn check_filtered(title: &str, expr: &str) {
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("tierproxy_") {
        let start = i + off;
        let mut end = start + PREFIX.len();
        while end < b.len() && is_ident(b[end]) {
            end += 1;
        }
        let selector = expr[end..]
            .strip_prefix('{')
            .and_then(|rest| rest.split_once('}'))
            .map(|(inside, _)| inside)
            .unwrap_or_else(|| {
                panic!(
                    "{title}: {} has no label selector in {expr}",
                    &expr[start..end]
                )
            });
        assert!(
            selector.contains("job=~\"$job\"") && selector.contains("instance=~\"$instance\""),
            "{title}: {} is not filtered by $job and $instance in {expr}",
            &expr[start..end]
        );
        i = end;
    }
}

#[test]
fn alert_rules_are_well_formed() {
    let text = read(ALERTS);
    assert!(!text.contains('\t'), "{ALERTS}: YAML does not allow tabs");
    assert!(
        text.lines().any(|l| l.trim_end() == "groups:"),
        "{ALERTS}: no top-level groups:"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("- name:")),
        "{ALERTS}: no rule group"
    );

    // Split into rules: each `- alert:` (or `- record:`) item runs to the next item
    // of the same kind or to the next group.
    let mut rules: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            rules.push((name.trim().to_string(), Vec::new()));
        } else if t.starts_with("- record:") || t.starts_with("- name:") {
            rules.push((String::new(), Vec::new()));
        } else if let Some((_, body)) = rules.last_mut() {
            body.push(t);
        }
    }
    rules.retain(|(name, _)| !name.is_empty());
    assert!(rules.len() >= 10, "only {} alerts", rules.len());

    let mut names = BTreeSet::new();
    for (name, body) in &rules {
        assert!(
            name.starts_with("Tierproxy") && name.bytes().all(|c| c.is_ascii_alphanumeric()),
            "alert name {name:?}"
        );
        assert!(names.insert(name.clone()), "alert {name} is defined twice");
        let field = |key: &str| {
            body.iter()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or_else(|| panic!("alert {name} has no {key}"))
        };
        let expr = field("expr:");
        // `expr: |` continues on the following lines.
        if expr == "|" || expr == ">" {
            let i = body.iter().position(|l| l.starts_with("expr:")).unwrap();
            assert!(
                body.get(i + 1)
                    .is_some_and(|l| l.contains("tierproxy_") || l.contains('(')),
                "alert {name}: an empty multi-line expr"
            );
        } else {
            assert!(!expr.is_empty(), "alert {name}: empty expr");
        }
        let severity = field("severity:").trim_matches('"');
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "alert {name}: severity {severity:?}"
        );
        field("labels:");
        field("annotations:");
        assert!(!field("summary:").is_empty(), "alert {name}: empty summary");
        assert!(
            !field("description:").is_empty(),
            "alert {name}: empty description"
        );
    }
    assert!(names.contains("TierproxyDown"));
}
