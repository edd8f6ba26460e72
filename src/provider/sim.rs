//! The built-in `sim` provider: a simulated LLM for offline runs, demos and benchmarks.
//!
//! It is a real [`Provider`]: it sleeps on the runtime's clock for a latency drawn from a
//! configured range, then returns a short reply that says it is simulated, with token
//! counts. Under a fixed seed every draw is a pure function of (seed, model, agent,
//! prompt, attempt), so a run is repeatable however the calls interleave; a retry
//! (a higher attempt number) draws afresh.
//!
//! It can enforce a provider account's limits ([`AccountLimits`]: requests per second
//! or minute, input tokens per minute, calls at once), answering 429 with `Retry-After`
//! and 529 past them and reporting its limits as a real API's rate-limit headers do, so
//! flow control can be watched and tested without a network. It can also inject faults,
//! so retries, breakers and fallbacks can be watched too: per-kind rates drawn under the same seed, and scripts that fail the first
//! N attempts of an agent with a given kind. A `timeout` fault never answers (the
//! attempt timeout or the deadline ends it); the others answer after a tenth of the
//! drawn latency (a quick rejection), except `server`, which takes all of it.

use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use serde::Deserialize;

use std::sync::Arc;

use super::{
    Account, AccountLimits, AccountRejection, AccountState, Completion, CompletionRequest,
    DeltaSink, ErrorKind, LimitedBy, Provider, ProviderError, RateLimits, Usage,
};

/// How a [`SimProvider`] behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Shortest simulated latency.
    pub latency_min: Duration,
    /// Longest simulated latency (inclusive).
    pub latency_max: Duration,
    /// Seed for every draw. `None` draws a random seed when the provider is built.
    pub seed: Option<u64>,
    /// Faults to inject.
    pub faults: SimFaults,
    /// The account limits to enforce (none by default).
    pub limits: AccountLimits,
}

/// A failure the simulator can inject, as an HTTP provider would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimFault {
    /// 429 with a `Retry-After` of [`SimFaults::retry_after`].
    RateLimited,
    /// 529 `overloaded_error`.
    Overloaded,
    /// 500 `api_error`.
    Server,
    /// The call never answers.
    Timeout,
    /// The connection is reset.
    Connection,
    /// 400 `invalid_request_error` (never retried).
    BadRequest,
    /// 401 `authentication_error` (never retried).
    Auth,
}

/// Which faults a [`SimProvider`] injects.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SimFaults {
    /// Fraction of calls (0–1) answered with a 429.
    pub rate_limited: f64,
    /// Fraction of calls answered with a 529.
    pub overloaded: f64,
    /// Fraction of calls answered with a 500.
    pub server: f64,
    /// Fraction of calls that never answer.
    pub timeout: f64,
    /// Fraction of calls whose connection is reset.
    pub connection: f64,
    /// The `Retry-After` of injected 429s; `None` sends none.
    pub retry_after: Option<Duration>,
    /// Scripted faults, checked before the rates.
    pub script: Vec<ScriptedFault>,
}

/// Fail the first `first_attempts` attempts of `agent`'s calls with `kind`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedFault {
    /// The agent whose calls fail.
    pub agent: String,
    /// How many attempts of each call fail (attempts 1 to N).
    pub first_attempts: u32,
    /// How they fail.
    pub kind: SimFault,
}

impl SimFaults {
    /// The fault for this call, if any: a script that matches, else a draw against the
    /// rates (`roll` is uniform in [0, 1)).
    fn pick(&self, request: &CompletionRequest, roll: f64) -> Option<SimFault> {
        if let Some(s) = self
            .script
            .iter()
            .find(|s| s.agent == request.meta.agent_id && request.meta.attempt <= s.first_attempts)
        {
            return Some(s.kind);
        }
        let mut edge = 0.0;
        for (rate, fault) in [
            (self.rate_limited, SimFault::RateLimited),
            (self.overloaded, SimFault::Overloaded),
            (self.server, SimFault::Server),
            (self.timeout, SimFault::Timeout),
            (self.connection, SimFault::Connection),
        ] {
            edge += rate;
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }
}

impl SimFault {
    /// The error a real provider would return for this fault.
    fn error(self, retry_after: Option<Duration>) -> ProviderError {
        match self {
            SimFault::RateLimited => {
                let e = ProviderError::new(
                    ErrorKind::RateLimited,
                    "rate_limit_error: simulated rate limit",
                )
                .with_status(429);
                match retry_after {
                    Some(wait) => e.with_retry_after(wait),
                    None => e,
                }
            }
            SimFault::Overloaded => ProviderError::new(
                ErrorKind::Overloaded,
                "overloaded_error: simulated overload",
            )
            .with_status(529),
            SimFault::Server => {
                ProviderError::new(ErrorKind::Server, "api_error: simulated internal error")
                    .with_status(500)
            }
            SimFault::Timeout => ProviderError::new(ErrorKind::Timeout, "simulated timeout"),
            SimFault::Connection => {
                ProviderError::new(ErrorKind::Connection, "simulated connection reset by peer")
            }
            SimFault::BadRequest => ProviderError::new(
                ErrorKind::BadRequest,
                "invalid_request_error: simulated bad request",
            )
            .with_status(400),
            SimFault::Auth => ProviderError::new(
                ErrorKind::Auth,
                "authentication_error: simulated invalid x-api-key",
            )
            .with_status(401),
        }
    }
}

impl Default for SimOptions {
    /// 0.5–2.0 s, the latency range of the original report's mock agents.
    fn default() -> Self {
        SimOptions {
            latency_min: Duration::from_millis(500),
            latency_max: Duration::from_millis(2000),
            seed: None,
            faults: SimFaults::default(),
            limits: AccountLimits::default(),
        }
    }
}

/// A simulated LLM: sleeps for a latency drawn from a range, then replies with a short
/// text that says it is simulated, and token counts (about four characters a token).
///
/// Under a fixed seed every draw is a pure function of (seed, model, agent, system
/// prompt, prompt, attempt): repeatable however calls interleave, and fresh on retry.
///
/// ```
/// use std::time::Duration;
/// use metaorch::provider::{CompletionRequest, Provider, RequestMeta, SimOptions, SimProvider};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let sim = SimProvider::new(SimOptions {
///     latency_min: Duration::ZERO,
///     latency_max: Duration::from_millis(1),
///     seed: Some(7),
///     ..SimOptions::default()
/// });
/// let request = CompletionRequest {
///     model: "sim-1".into(),
///     system: None,
///     prompt: "Why is the sky blue?".into(),
///     max_tokens: 256,
///     temperature: None,
///     meta: RequestMeta::default(),
///     ..CompletionRequest::default()
/// };
/// let reply = sim.complete(&request).await.unwrap();
/// assert!(reply.text.contains("simulated"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SimProvider {
    options: SimOptions,
    seed: u64,
    /// The account every call is admitted by, when limits are set. Clones share it.
    account: Option<Arc<Account>>,
}

impl SimProvider {
    /// Builds a simulator. `latency_max` below `latency_min` is treated as equal to it.
    pub fn new(options: SimOptions) -> Self {
        let seed = options.seed.unwrap_or_else(rand::random);
        let account = (!options.limits.is_empty()).then(|| Arc::new(Account::new(options.limits)));
        SimProvider {
            options,
            seed,
            account,
        }
    }

    /// The seed in use (drawn at random when none was configured).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn rng_for(&self, request: &CompletionRequest) -> SmallRng {
        let mut h = Fnv64::new(self.seed);
        h.write(request.model.as_bytes());
        h.write(request.meta.agent_id.as_bytes());
        h.write(request.system.as_deref().unwrap_or("").as_bytes());
        h.write(request.prompt.as_bytes());
        h.write(&request.meta.attempt.to_le_bytes());
        SmallRng::seed_from_u64(h.finish())
    }

    fn draw_latency(&self, rng: &mut SmallRng) -> Duration {
        let min = self.options.latency_min;
        let max = self.options.latency_max.max(min);
        let span = (max - min).as_nanos() as u64;
        min + Duration::from_nanos(if span == 0 {
            0
        } else {
            rng.random_range(0..=span)
        })
    }
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn identity(&self) -> String {
        format!("sim seed {}", self.seed)
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        let mut rng = self.rng_for(request);
        let started = tokio::time::Instant::now();
        let input_tokens = estimate_tokens(request.system.as_deref().unwrap_or(""))
            + request
                .history
                .iter()
                .map(|t| estimate_tokens(&t.content))
                .sum::<u64>()
            + estimate_tokens(&request.prompt);
        // Held until the reply: the account counts the call in progress.
        let admitted = match &self.account {
            Some(account) => Some(account.admit(input_tokens).map_err(refused)?),
            None => None,
        };
        let latency = self.draw_latency(&mut rng);
        let roll: f64 = rng.random();
        if let Some(fault) = self.options.faults.pick(request, roll) {
            match fault {
                SimFault::Timeout => std::future::pending::<()>().await,
                SimFault::Server => tokio::time::sleep(latency).await,
                _ => tokio::time::sleep(latency / 10).await,
            }
            return Err(fault.error(self.options.faults.retry_after));
        }
        let mut text = reply_text(request, &mut rng);
        // Like a model, it stops at max_tokens (about four characters a token).
        let cut = usize::try_from(u64::from(request.max_tokens) * 4).unwrap_or(usize::MAX);
        let stop_reason = if text.len() > cut {
            let mut end = cut;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            "max_tokens"
        } else {
            "end_turn"
        };
        match &request.deltas {
            // Boxed: inline, the stream's state would make every call's future larger.
            Some(sink) if request.stream => Box::pin(stream(sink, request, &text, latency)).await,
            _ => tokio::time::sleep(latency).await,
        }
        let latency = started.elapsed();

        let output_tokens = estimate_tokens(&text).min(u64::from(request.max_tokens));
        Ok(Completion {
            text,
            stop_reason: Some(stop_reason.to_owned()),
            usage: Usage {
                input_tokens,
                output_tokens,
                ..Usage::default()
            },
            latency,
            rate_limits: admitted.map(|permit| Box::new(rate_limits(&permit.state))),
            ..Completion::default()
        })
    }
}

/// The error a real API answers a refused call with: 429 with `Retry-After` for a rate
/// limit, 529 `overloaded_error` past the concurrency limit; with its rate-limit state.
fn refused(rejection: AccountRejection) -> ProviderError {
    let error = match rejection.limited_by {
        LimitedBy::MaxConcurrent => ProviderError::new(
            ErrorKind::Overloaded,
            format!("overloaded_error: {rejection}"),
        )
        .with_status(529),
        _ => ProviderError::new(
            ErrorKind::RateLimited,
            format!("rate_limit_error: {rejection}"),
        )
        .with_status(429),
    };
    let error = match rejection.retry_after {
        Some(wait) => error.with_retry_after(wait),
        None => error,
    };
    error.with_rate_limits(rate_limits(&rejection.state))
}

/// An account's state as Anthropic's rate-limit headers state it (per minute; the
/// token limit counts input tokens).
fn rate_limits(state: &AccountState) -> RateLimits {
    RateLimits {
        requests_limit: state.requests.map(|b| b.limit_per_minute),
        requests_remaining: state.requests.map(|b| b.remaining),
        input_tokens_limit: state.tokens.map(|b| b.limit_per_minute),
        input_tokens_remaining: state.tokens.map(|b| b.remaining),
        ..RateLimits::default()
    }
}

const OBSERVATIONS: &[&str] = &[
    "The main trade-off is between speed of delivery and long-term maintainability.",
    "Evidence from comparable cases points to a gradual, measured rollout.",
    "The riskiest assumption should be tested first, with a small experiment.",
    "Costs are front-loaded, while the benefits accrue over several quarters.",
    "Two independent sources agree on the core facts; one detail remains unverified.",
    "A clear owner and a rollback plan matter more than the choice of tool.",
    "Operational load, not the initial build, dominates the total cost.",
    "The strongest counter-argument concerns team familiarity and hiring.",
];

/// Sends `text` to `sink` the way a model writes: the first words after a quarter of
/// `latency` (time to first token), the rest spread evenly over what remains.
async fn stream(sink: &DeltaSink, request: &CompletionRequest, text: &str, latency: Duration) {
    let pieces: Vec<&str> = text.split_inclusive(' ').collect();
    let first_token = latency / 4;
    tokio::time::sleep(first_token).await;
    let n = u32::try_from(pieces.len()).unwrap_or(u32::MAX).max(1);
    let gap = latency.saturating_sub(first_token) / n;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        sink.send(request, piece);
    }
    tokio::time::sleep(gap).await;
}

/// A short reply that says plainly it is simulated and echoes whose turn it was. A
/// prompt that holds agents' replies (`<reply agent="…"`, as the synthesizer renders
/// them) gets a merge that names them.
fn reply_text(request: &CompletionRequest, rng: &mut SmallRng) -> String {
    let first = rng.random_range(0..OBSERVATIONS.len());
    let second = (first + 1 + rng.random_range(0..OBSERVATIONS.len() - 1)) % OBSERVATIONS.len();
    let merged: Vec<&str> = request
        .prompt
        .split(REPLY_TAG)
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(id, _)| id))
        .collect();
    if !merged.is_empty() {
        return format!(
            "[simulated synthesis by {model}] Merging the replies of {}: {} {}",
            merged.join(", "),
            OBSERVATIONS[first],
            OBSERVATIONS[second],
            model = request.model,
        );
    }
    let topic: String = request.prompt.chars().take(80).collect();
    let ellipsis = if request.prompt.chars().count() > 80 {
        "…"
    } else {
        ""
    };
    format!(
        "[simulated reply from {model}] On \"{topic}{ellipsis}\": {} {}",
        OBSERVATIONS[first],
        OBSERVATIONS[second],
        model = request.model,
    )
}

/// How the synthesizer's prompt opens each agent's reply.
const REPLY_TAG: &str = "<reply agent=\"";

/// About four characters per token, the usual rule of thumb for English text.
fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// FNV-1a, 64-bit: a stable hash, so a seed means the same thing across builds.
struct Fnv64(u64);

impl Fnv64 {
    fn new(seed: u64) -> Self {
        let mut h = Fnv64(0xcbf2_9ce4_8422_2325);
        h.write(&seed.to_le_bytes());
        h
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab","c") and ("a","bc") hash differently.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::RequestMeta;

    fn request(agent: &str, attempt: u32) -> CompletionRequest {
        CompletionRequest {
            model: "sim-1".into(),
            system: Some("You are a critic.".into()),
            prompt: "Should we rewrite it in Rust?".into(),
            max_tokens: 512,
            temperature: None,
            stop_sequences: Vec::new(),
            stream: false,
            prompt_cache: false,
            meta: RequestMeta {
                trace_id: "0".repeat(32),
                agent_id: agent.into(),
                attempt,
            },
            ..CompletionRequest::default()
        }
    }

    fn sim(seed: u64) -> SimProvider {
        SimProvider::new(SimOptions {
            seed: Some(seed),
            ..SimOptions::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn same_seed_same_reply_and_latency() {
        let a = sim(42).complete(&request("critic", 1)).await.unwrap();
        let b = sim(42).complete(&request("critic", 1)).await.unwrap();
        assert_eq!(a, b);
        assert!(a.text.starts_with("[simulated reply from sim-1]"));
        assert!(a.usage.input_tokens > 0 && a.usage.output_tokens > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_stays_in_range_and_varies_by_agent_and_attempt() {
        let p = sim(1);
        let mut seen = std::collections::HashSet::new();
        for agent in ["a", "b", "c", "d"] {
            for attempt in 1..=3 {
                let started = tokio::time::Instant::now();
                let c = p.complete(&request(agent, attempt)).await.unwrap();
                assert_eq!(started.elapsed(), c.latency, "reports the time it slept");
                // The timer wheel rounds up to the next whole millisecond.
                assert!(
                    (500..=2001).contains(&c.latency.as_millis()),
                    "{:?}",
                    c.latency
                );
                seen.insert(c.latency);
            }
        }
        assert!(
            seen.len() > 6,
            "draws should differ across agents and attempts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn inverted_range_is_a_fixed_latency() {
        let p = SimProvider::new(SimOptions {
            latency_min: Duration::from_millis(30),
            latency_max: Duration::from_millis(10),
            seed: Some(3),
            ..SimOptions::default()
        });
        let c = p.complete(&request("x", 1)).await.unwrap();
        assert_eq!(c.latency, Duration::from_millis(30));
    }

    fn faulty(faults: SimFaults) -> SimProvider {
        SimProvider::new(SimOptions {
            seed: Some(5),
            faults,
            ..SimOptions::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn scripts_fail_the_first_attempts_of_one_agent() {
        let p = faulty(SimFaults {
            script: vec![ScriptedFault {
                agent: "critic".into(),
                first_attempts: 2,
                kind: SimFault::Overloaded,
            }],
            ..SimFaults::default()
        });
        for attempt in 1..=2 {
            let e = p.complete(&request("critic", attempt)).await.unwrap_err();
            assert_eq!((e.kind, e.status), (ErrorKind::Overloaded, Some(529)));
        }
        assert!(p.complete(&request("critic", 3)).await.is_ok());
        assert!(p.complete(&request("writer", 1)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rates_are_drawn_under_the_seed() {
        let faults = SimFaults {
            rate_limited: 0.3,
            retry_after: Some(Duration::from_secs(2)),
            ..SimFaults::default()
        };
        let (a, b) = (faulty(faults.clone()), faulty(faults));
        let mut limited = 0;
        for i in 0..200 {
            let agent = format!("agent-{i}");
            let (x, y) = (
                a.complete(&request(&agent, 1)).await,
                b.complete(&request(&agent, 1)).await,
            );
            assert_eq!(x, y, "same seed, same fate");
            if let Err(e) = x {
                assert_eq!(e.status, Some(429));
                assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
                limited += 1;
            }
        }
        assert!(
            (35..=85).contains(&limited),
            "{limited} of 200 at a 30% rate"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_fault_never_answers() {
        let p = faulty(SimFaults {
            timeout: 1.0,
            ..SimFaults::default()
        });
        let r = request("x", 1);
        let call = p.complete(&r);
        let waited = tokio::time::timeout(Duration::from_secs(3600), call).await;
        assert!(waited.is_err());
    }
}
