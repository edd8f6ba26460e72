//! A batch's running totals, shown as a progress bar on a terminal (indicatif) or as a
//! plain line every few seconds when stderr is a file or a pipe, and summed up at the
//! end.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use metaorch::{OutcomeStatus, Response};
use serde::Serialize;

/// How often a plain progress line is written when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// What this run has done so far.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    /// Requests that met `min_successes`.
    pub ok: u64,
    /// Requests that did not.
    pub failed: u64,
    /// Agent outcomes by status.
    pub agents: AgentCounts,
    /// Retries over every agent.
    pub retries: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// US dollars, over the requests whose calls all have a known price.
    pub cost_usd: f64,
    /// Requests with a call of a model that has no known price: left out of `cost_usd`.
    pub cost_unknown_requests: u64,
    /// Each finished request's wall time, in milliseconds.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct AgentCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
}

impl Totals {
    pub fn done(&self) -> u64 {
        self.ok + self.failed
    }

    pub fn add(&mut self, response: &Response) {
        if response.ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        for o in &response.outcomes {
            match o.status {
                OutcomeStatus::Succeeded => self.agents.succeeded += 1,
                OutcomeStatus::Failed => self.agents.failed += 1,
                OutcomeStatus::TimedOut => self.agents.timed_out += 1,
            }
            self.retries += o.retries.len() as u64;
        }
        self.input_tokens = self
            .input_tokens
            .saturating_add(response.usage.input_tokens);
        self.output_tokens = self
            .output_tokens
            .saturating_add(response.usage.output_tokens);
        match response.usage.cost_usd {
            Some(c) => self.cost_usd += c,
            None => self.cost_unknown_requests += 1,
        }
        self.latencies_ms
            .push(response.timings.total.as_secs_f64() * 1000.0);
    }

    /// A request that could not run at all.
    pub fn add_error(&mut self) {
        self.failed += 1;
    }

    /// `p` (0–100) of the requests' wall times, in milliseconds.
    pub fn latency_percentile(&self, p: f64) -> Option<f64> {
        if self.latencies_ms.is_empty() {
            return None;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Some(crate::cli::bench::stats::percentile(&sorted, p))
    }

    /// One line: ok, failed, agents failed, retries, tokens, cost.
    pub fn line(&self) -> String {
        self.counts(
            "; ",
            format!("{} tokens; {}", tokens(self.total_tokens()), self.cost()),
        )
    }

    /// The same, short enough for a progress bar.
    pub fn short(&self) -> String {
        let unpriced = if self.cost_unknown_requests > 0 {
            "+"
        } else {
            ""
        };
        self.counts(
            " · ",
            format!(
                "{} tok · ${:.2}{unpriced}",
                tokens(self.total_tokens()),
                self.cost_usd
            ),
        )
    }

    fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Requests ok and failed, agents failed and retries (when any), then `last`.
    fn counts(&self, sep: &str, last: String) -> String {
        let mut out = format!("{} ok{sep}{} failed", self.ok, self.failed);
        let agents_bad = self.agents.failed + self.agents.timed_out;
        if agents_bad > 0 {
            let _ = write!(out, "{sep}{agents_bad} agents failed");
        }
        if self.retries > 0 {
            let _ = write!(out, "{sep}{} retries", self.retries);
        }
        out.push_str(sep);
        out.push_str(&last);
        out
    }

    pub fn cost(&self) -> String {
        match self.cost_unknown_requests {
            0 => format!("${:.4}", self.cost_usd),
            n if n == self.done() => "cost unknown (no [prices] for the models)".to_owned(),
            n => format!(
                "${:.4} + {n} requests of models with no [prices] entry",
                self.cost_usd
            ),
        }
    }
}

/// 1234 → "1.2k", 3_400_000 → "3.4M".
fn tokens(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// Where progress goes.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    last_plain: Instant,
}

impl Progress {
    /// A bar when stderr is a terminal (drawn from [`Progress::start`]); plain lines
    /// otherwise.
    pub fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
            let style = ProgressStyle::with_template(
                "{spinner} {pos}/{len} [{bar:16}] ETA {eta} · {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            started: now,
            last_plain: now,
        }
    }

    /// Starts drawing the bar, and the clock of the rate and the ETA.
    pub fn start(&mut self) {
        if let Some(bar) = &self.bar {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        self.started = Instant::now();
        self.last_plain = self.started;
    }

    /// Writes `line` (a log line, whole) to stderr without breaking the bar: the bar is
    /// cleared, the line written, the bar drawn again.
    pub fn writer(&self) -> impl Fn(&[u8]) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |line: &[u8]| {
            let write = || {
                use std::io::Write as _;
                let _ = std::io::stderr().lock().write_all(line);
            };
            match &bar {
                Some(bar) => bar.suspend(write),
                None => write(),
            }
        }
    }

    pub fn update(&mut self, totals: &Totals) {
        if let Some(bar) = &self.bar {
            bar.set_position(totals.done());
            bar.set_message(format!("{:.1}/s · {}", self.rate(totals), totals.short()));
        }
    }

    /// On a tick: the plain line, when it is time for one.
    pub fn tick(&mut self, totals: &Totals) {
        if self.bar.is_some() || self.last_plain.elapsed() < PLAIN_EVERY {
            return;
        }
        self.last_plain = Instant::now();
        let done = totals.done();
        let rate = self.rate(totals);
        let eta = if rate > 0.0 && self.total > done {
            format!(
                ", ETA {}",
                humantime::format_duration(Duration::from_secs(
                    ((self.total - done) as f64 / rate).ceil() as u64
                ))
            )
        } else {
            String::new()
        };
        eprintln!(
            "batch: {done}/{} done, {rate:.1} requests/s{eta}; {}",
            self.total,
            totals.line()
        );
    }

    /// Requests per second so far.
    fn rate(&self, totals: &Totals) -> f64 {
        totals.done() as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Says something without breaking the bar.
    pub fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
