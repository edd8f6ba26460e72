//! The one resilience policy every agent call goes through (the original report's
//! `@resilient_call`): for each attempt, admission by the provider and model's flow
//! control and a process-wide slot, the provider's circuit breaker, the call under the
//! attempt timeout and the request deadline; then classification, what came back
//! reported to flow control, and a retry after backoff or the server's `Retry-After`,
//! paid for from the provider and model's retry budget. Fallbacks are applied above
//! this, by the executor, with a second call through the same policy.
//!
//! It wraps any [`Provider`](crate::provider::Provider) and knows no wire format. It is the only retry layer:
//! providers never retry on their own.

mod backoff;
mod breaker;
mod budget;
mod call;
mod classify;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

use crate::executor::as_millis;
use crate::per_model::PerModel;
use crate::provider::ErrorKind;

pub use backoff::{Jitter, RetryPolicy};
pub use breaker::{
    BreakerConfig, BreakerPermit, BreakerSnapshot, BreakerState, CallResult, CircuitBreaker,
    Rejected, Window,
};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use call::MAX_PAUSE;
pub(crate) use call::{Call, CallReport};
pub use classify::{counts_against_provider, is_flow_control, is_retryable, kind_is_retryable};

/// The per-agent part of the policy: how to retry, and how long one attempt may take.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPolicy {
    /// When and how often to retry.
    pub retry: RetryPolicy,
    /// The longest one attempt may take; `None` leaves only the request deadline.
    pub attempt_timeout: Option<Duration>,
}

/// One attempt's limit, unless configured.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for CallPolicy {
    /// [`RetryPolicy::default`] and a 30 s attempt timeout.
    fn default() -> Self {
        CallPolicy {
            retry: RetryPolicy::default(),
            attempt_timeout: Some(DEFAULT_ATTEMPT_TIMEOUT),
        }
    }
}

impl CallPolicy {
    /// A policy that tries once: no retries.
    pub fn once() -> Self {
        CallPolicy {
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..CallPolicy::default()
        }
    }
}

/// Why a retry waited as long as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DelaySource {
    /// The policy's backoff and jitter.
    Backoff,
    /// The server's `Retry-After` (clamped to `retry_after_max`).
    RetryAfter,
}

impl DelaySource {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DelaySource::Backoff => "backoff",
            DelaySource::RetryAfter => "retry_after",
        }
    }
}

/// One retry: which attempt failed, how, and how long the call waited before the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryRecord {
    /// The attempt that failed (1 for the first try).
    pub attempt: u32,
    /// The model the attempt asked for: the agent's, or its fallback's.
    pub model: String,
    /// How it failed.
    pub error: ErrorKind,
    /// Its HTTP status, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The wait before the next attempt.
    #[serde(rename = "delay_ms", serialize_with = "as_millis")]
    pub delay: Duration,
    /// Where the wait came from.
    pub source: DelaySource,
}

/// The state the policy shares across every request of a process: the retry budgets
/// and circuit breakers (one of each per provider and model) and the jitter's random
/// source.
#[derive(Debug)]
pub struct Resilience {
    budget_config: RetryBudgetConfig,
    budgets: PerModel<RetryBudget>,
    breaker_config: BreakerConfig,
    breakers: PerModel<CircuitBreaker>,
    rng: Mutex<SmallRng>,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience::new(RetryBudgetConfig::default(), BreakerConfig::default(), None)
    }
}

impl Resilience {
    /// Shared state with this budget and breaker config (each provider and model gets
    /// its own budget and breaker). `seed` makes jitter repeatable; `None` seeds from
    /// the operating system.
    pub fn new(budget: RetryBudgetConfig, breaker: BreakerConfig, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        Resilience {
            budget_config: budget,
            budgets: PerModel::default(),
            breaker_config: breaker,
            breakers: PerModel::default(),
            rng: Mutex::new(rng),
        }
    }

    /// The retry budget of `provider` / `model`, full on first use. Each provider and
    /// model has its own, so a failing one cannot spend another's retries.
    pub fn budget(&self, provider: &str, model: &str) -> Arc<RetryBudget> {
        self.budgets.get(provider, model, || {
            RetryBudget::new(self.budget_config.clone())
        })
    }

    /// The breaker for `provider` / `model`, created closed on first use.
    pub fn breaker(&self, provider: &str, model: &str) -> Arc<CircuitBreaker> {
        self.breakers.get(provider, model, || {
            CircuitBreaker::new(provider, model, self.breaker_config.clone())
        })
    }

    /// Every breaker's state, ordered by provider and model.
    pub fn breakers(&self) -> Vec<BreakerSnapshot> {
        self.breakers.all().iter().map(|b| b.snapshot()).collect()
    }

    fn draw_delay(&self, policy: &RetryPolicy, retry: u32, previous: Duration) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        policy.delay(retry, previous, &mut *rng)
    }
}
