//! Text output for people: a table of agent outcomes, the answer, the trace id. The
//! replies and errors in it come from upstream, so the whole is stripped of control
//! characters and escape sequences before it reaches a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use metaorch::config::{Config, ProviderConfig};
use metaorch::telemetry::terminal_safe;
use metaorch::{AgentOutcome, OutcomeStatus, Response};

/// The whole text report of a response.
pub fn response(response: &Response, config: &Config) -> String {
    let mut out = outcomes(&response.outcomes);
    out.push_str(&breakers_and_summary(response, config));
    let _ = writeln!(out, "\n{}\n", response.answer);
    let _ = writeln!(out, "trace_id: {}", response.trace_id);
    terminal_safe(&out).into_owned()
}

/// The report's end, for an answer already shown as it streamed: the breakers, the
/// summary and the trace id.
pub fn after_streamed_answer(response: &Response, config: &Config) -> String {
    let mut out = breakers_and_summary(response, config);
    let _ = writeln!(out, "\ntrace_id: {}", response.trace_id);
    terminal_safe(&out).into_owned()
}

/// The table of agent outcomes, with a note under each for its waits, retries,
/// fallback and error.
pub fn outcomes(outcomes: &[AgentOutcome]) -> String {
    let mut out = String::new();
    let id_width = outcomes
        .iter()
        .map(|o| o.agent_id.len())
        .max()
        .unwrap_or(5)
        .max(5);
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<id_width$}  {:<10}  {:>9}  {:>8}  {:>10}  {:<8}  MODEL",
        "AGENT", "STATUS", "LATENCY", "ATTEMPTS", "COST", "PROVIDER"
    );
    for o in outcomes {
        let status = match o.status {
            OutcomeStatus::Succeeded => "ok",
            OutcomeStatus::Failed => "failed",
            OutcomeStatus::TimedOut => "timed out",
        };
        let _ = writeln!(
            out,
            "{:<id_width$}  {:<10}  {:>9}  {:>8}  {:>10}  {:<8}  {}",
            o.agent_id,
            status,
            seconds(o.latency),
            o.attempts,
            o.cost_usd.map_or_else(|| "unknown".to_owned(), usd),
            o.provider,
            o.model
        );
        let mut notes = Vec::new();
        if o.cached {
            notes.push("answered from the cache: no upstream call".to_owned());
        }
        // Waits worth a mention: a tenth of a second or more.
        if o.queue_wait >= Duration::from_millis(100) {
            let pause = if o.paused >= Duration::from_millis(100) {
                format!(
                    " ({} behind a pause at the provider's request)",
                    seconds(o.paused)
                )
            } else {
                String::new()
            };
            notes.push(format!(
                "waited {} to be let through{pause}",
                seconds(o.queue_wait)
            ));
        }
        for r in &o.retries {
            let status = r.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            // A fallback's attempts say whose they were.
            let whose = if r.model == o.model {
                String::new()
            } else {
                format!(" on {}", r.model)
            };
            notes.push(format!(
                "attempt {}{whose} failed: {}{status}; retried after {} ({})",
                r.attempt,
                r.error,
                seconds(r.delay),
                r.source.as_str()
            ));
        }
        if let Some(f) = &o.fallback {
            let to = match (&f.agent, &f.provider, &f.model) {
                (Some(agent), Some(provider), Some(model)) => {
                    format!("agent {agent} ({provider}/{model})")
                }
                _ => "its fallback text".to_owned(),
            };
            notes.push(format!("fell back to {to} after: {}", f.primary_error));
        }
        if let Some(error) = &o.error {
            notes.push(error.to_string());
        }
        for (i, note) in notes.iter().enumerate() {
            let branch = if i + 1 == notes.len() { '└' } else { '├' };
            let _ = writeln!(out, "{:<id_width$}  {branch} {note}", "");
        }
    }
    terminal_safe(&out).into_owned()
}

fn breakers_and_summary(response: &Response, config: &Config) -> String {
    let mut out = String::new();
    for b in &response.breakers {
        let until = b
            .retry_in
            .map(|d| format!("; probes in {}", seconds(d)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "circuit {}/{} is {}{until}",
            b.provider, b.model, b.state
        );
    }

    let s = &response.summary;
    let t = &response.timings;
    let _ = writeln!(
        out,
        "\n{}/{} agents succeeded (min {}) in {}; slowest agent {}, all agents one after another {}; concurrency limit {}.",
        s.succeeded,
        response.outcomes.len(),
        s.min_successes,
        seconds(t.total),
        seconds(t.slowest_agent),
        seconds(t.sum_of_agents),
        config.concurrency_limit,
    );
    if let Some(r) = response.synthesis.report() {
        let call = format!("{}/{}", r.provider, r.model);
        let _ = match &r.reason {
            None => writeln!(
                out,
                "synthesis: {call} in {} ({} attempt{}, {})",
                seconds(r.latency),
                r.attempts,
                if r.attempts == 1 { "" } else { "s" },
                r.cost_usd.map_or_else(|| "cost unknown".to_owned(), usd)
            ),
            Some(reason) => writeln!(
                out,
                "synthesis: {call} {}: {reason}; the answer is the replies laid end to end",
                r.status.as_str()
            ),
        };
    }
    let u = &response.usage;
    let cache = match (u.cache_creation_input_tokens, u.cache_read_input_tokens) {
        (0, 0) => String::new(),
        (write, read) => format!(" ({write} written to the prompt cache, {read} read from it)"),
    };
    let _ = writeln!(
        out,
        "tokens: {} in, {} out{cache}; {}",
        u.input_tokens,
        u.output_tokens,
        cost_line(response, config)
    );
    terminal_safe(&out).into_owned()
}

/// The request's cost, or which agents' models have no price.
fn cost_line(response: &Response, config: &Config) -> String {
    let Some(total) = response.usage.cost_usd else {
        let synthesizer = response
            .synthesis
            .report()
            .filter(|r| r.cost_usd.is_none())
            .map(|_| "the synthesizer");
        let unpriced: Vec<&str> = response
            .outcomes
            .iter()
            .filter(|o| o.cost_usd.is_none())
            .map(|o| o.agent_id.as_str())
            .chain(synthesizer)
            .collect();
        return format!(
            "cost unknown: no price for the model of {} (`metaorch config check` lists them; set [prices.\"MODEL\"])",
            unpriced.join(", ")
        );
    };
    let simulated = response.outcomes.iter().any(|o| {
        matches!(
            config.providers.get(&o.provider),
            Some(ProviderConfig::Sim(_))
        )
    });
    let note = if simulated {
        " (illustrative: the sim provider bills nothing)"
    } else {
        ""
    };
    format!("cost {}{note}", usd(total))
}

/// US dollars to a millionth under a cent, to a ten-thousandth above.
pub fn usd(amount: f64) -> String {
    if amount == 0.0 {
        "$0".to_owned()
    } else if amount < 0.01 {
        format!("${amount:.6}")
    } else {
        format!("${amount:.4}")
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
