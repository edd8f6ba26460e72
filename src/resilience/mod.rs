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

use crate::per_model::PerModel;

pub use crate::outcome::{DelaySource, RetryRecord};
pub use backoff::{Jitter, RetryPolicy};
pub use breaker::{
    BreakerConfig, BreakerPermit, BreakerSnapshot, BreakerState, CallResult, CircuitBreaker,
    Rejected, Window,
};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use call::MAX_PAUSE;
pub(crate) use call::{Call, CallProgress, CallReport};
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
