//! `metaorch_cost_usd_total`, kept beside the Prometheus exporter rather than in it:
//! the `metrics` facade's counters count whole units, and what a call costs is a small
//! fraction of a dollar (a call to a small model, a millionth). The counter is kept
//! here as a float per provider and model and rendered in the exposition format after
//! the exporter's own text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

const NAME: &str = "metaorch_cost_usd_total";
const HELP: &str = "What calls cost in US dollars at the configured prices, by provider and model (calls to models without a price are not counted).";

/// US dollars spent, by provider, then model.
static SPENT: Mutex<BTreeMap<String, BTreeMap<String, f64>>> = Mutex::new(BTreeMap::new());

/// Adds `usd` to the provider and model's total.
pub(super) fn add(provider: &str, model: &str, usd: f64) {
    let mut spent = SPENT.lock().unwrap_or_else(|e| e.into_inner());
    // Looked up by reference first: no allocation once the series exists.
    match spent.get_mut(provider).and_then(|m| m.get_mut(model)) {
        Some(total) => *total += usd,
        None => {
            *spent
                .entry(provider.to_owned())
                .or_default()
                .entry(model.to_owned())
                .or_default() += usd;
        }
    }
}

/// The counter in Prometheus's text format, after a blank line.
pub(super) fn render() -> String {
    let spent = SPENT.lock().unwrap_or_else(|e| e.into_inner());
    if spent.is_empty() {
        return String::new();
    }
    let mut out = format!("\n# HELP {NAME} {HELP}\n# TYPE {NAME} counter\n");
    for (provider, models) in spent.iter() {
        for (model, usd) in models {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "{NAME}{{provider=\"{}\",model=\"{}\"}} {}",
                escape(provider),
                escape(model),
                crate::cost::round_usd(*usd)
            );
        }
    }
    out
}

/// A label value as the exposition format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_render_as_a_counter_with_escaped_labels() {
        add("test-usd", "m\"1", 0.25);
        add("test-usd", "m\"1", 0.5);
        let text = render();
        assert!(text.contains("# TYPE metaorch_cost_usd_total counter\n"));
        assert!(
            text.contains("metaorch_cost_usd_total{provider=\"test-usd\",model=\"m\\\"1\"} 0.75\n"),
            "{text}"
        );
    }
}
