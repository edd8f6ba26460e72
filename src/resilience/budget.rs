//! The process-wide retry budget: a token bucket in the manner of the AWS SDKs' retry
//! quota, so that an outage does not multiply load. Each retry withdraws tokens; a
//! first try that succeeds deposits one; a retry that succeeds returns what it cost.
//! When the bucket cannot pay for a retry, the call gives up at once
//! (`retry_budget_exhausted`) and first tries carry on as usual.
//!
//! Written here rather than taken from tower's `TpsBudget` because it must count
//! timeouts dearer than other failures and report its level, and because it is a few
//! lines of atomics with no time source, which keeps it exact under tokio's paused clock.

use std::sync::atomic::{AtomicU32, Ordering};

/// The retry budget's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudgetConfig {
    /// Tokens in a full bucket, and at start.
    pub capacity: u32,
    /// Tokens a retry costs.
    pub retry_cost: u32,
    /// Tokens a retry after a timeout costs (timeouts hold resources longer).
    pub timeout_cost: u32,
    /// Tokens a first try that succeeds puts back.
    pub success_deposit: u32,
}

impl Default for RetryBudgetConfig {
    /// The AWS SDKs' standard quota: 500 tokens, 5 a retry, 10 after a timeout, 1 back
    /// for each success. 100 retries in a burst, then one retry per five successes.
    fn default() -> Self {
        RetryBudgetConfig {
            capacity: 500,
            retry_cost: 5,
            timeout_cost: 10,
            success_deposit: 1,
        }
    }
}

/// A shared bucket of retry tokens. Lock-free; share it behind an `Arc`.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    tokens: AtomicU32,
}

impl RetryBudget {
    /// A full bucket.
    pub fn new(config: RetryBudgetConfig) -> Self {
        RetryBudget {
            tokens: AtomicU32::new(config.capacity),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    /// Tokens left.
    pub fn available(&self) -> u32 {
        self.tokens.load(Ordering::Acquire)
    }

    /// What a retry after this failure costs.
    pub fn cost(&self, after_timeout: bool) -> u32 {
        if after_timeout {
            self.config.timeout_cost
        } else {
            self.config.retry_cost
        }
    }

    /// Takes `cost` tokens for a retry; false (and nothing taken) when there are too few.
    pub fn withdraw(&self, cost: u32) -> bool {
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(cost))
            .is_ok()
    }

    /// Records a success: a first try deposits `success_deposit`, a retry returns
    /// `refund` (what it cost). The bucket never holds more than its capacity.
    pub fn on_success(&self, refund: Option<u32>) {
        let amount = refund.unwrap_or(self.config.success_deposit);
        let capacity = self.config.capacity;
        // `fetch_update` cannot fail: the closure always returns `Some`.
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(amount).min(capacity))
            });
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(RetryBudgetConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdraws_until_empty_then_refuses() {
        let b = RetryBudget::new(RetryBudgetConfig {
            capacity: 12,
            retry_cost: 5,
            timeout_cost: 10,
            success_deposit: 1,
        });
        assert!(b.withdraw(b.cost(false)));
        assert!(b.withdraw(b.cost(false)));
        assert!(!b.withdraw(b.cost(false)), "2 tokens left, 5 needed");
        assert_eq!(b.available(), 2);
        assert!(!b.withdraw(b.cost(true)));
    }

    #[test]
    fn successes_refill_up_to_capacity() {
        let b = RetryBudget::new(RetryBudgetConfig {
            capacity: 10,
            ..RetryBudgetConfig::default()
        });
        assert!(b.withdraw(10));
        b.on_success(None);
        assert_eq!(b.available(), 1);
        b.on_success(Some(5));
        assert_eq!(b.available(), 6);
        b.on_success(Some(500));
        assert_eq!(b.available(), 10);
    }
}
