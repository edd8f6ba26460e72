//! Flow control's settings, and the registry that gives every caller of the same
//! provider and model the same [`FlowLane`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::adaptive::AdaptiveConfig;
use super::lane::{FlowLane, LaneSnapshot};
use crate::per_model::PerModel;

/// Requests and tokens per minute; `None` for no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RateConfig {
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute, input and output together (OpenAI's TPM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Input tokens per minute (Anthropic's ITPM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tpm: Option<u64>,
    /// Output tokens per minute (Anthropic's OTPM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tpm: Option<u64>,
}

impl RateConfig {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == RateConfig::default()
    }
}

impl fmt::Display for RateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (value, unit) in [
            (self.rpm, "requests/min"),
            (self.tpm, "tokens/min"),
            (self.input_tpm, "input tokens/min"),
            (self.output_tpm, "output tokens/min"),
        ] {
            if let Some(v) = value {
                parts.push(format!("{v} {unit}"));
            }
        }
        if parts.is_empty() {
            f.write_str("no rate limit")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// How calls to one provider and model are paced.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    /// The concurrency limit: adaptive between bounds, or fixed.
    pub concurrency: AdaptiveConfig,
    /// Rate limits set in the config.
    pub rates: RateConfig,
    /// Lower the rate limits to what the provider's rate-limit headers report.
    pub learn_limits: bool,
}

impl Default for FlowConfig {
    /// Adaptive concurrency ([`AdaptiveConfig::default`]), no configured rate limit,
    /// limits learned from the provider's headers.
    fn default() -> Self {
        FlowConfig {
            concurrency: AdaptiveConfig::default(),
            rates: RateConfig::default(),
            learn_limits: true,
        }
    }
}

/// Every lane of the process, one per provider and model, created on first use.
/// Share it behind an `Arc`: lanes must be shared by every request, since a
/// provider's limits are per account, not per request.
#[derive(Debug, Default)]
pub struct FlowControl {
    defaults: FlowConfig,
    providers: BTreeMap<String, FlowConfig>,
    lanes: PerModel<FlowLane>,
    /// Limits shared with other instances through Redis (`[redis]`), if any.
    cluster: Option<Arc<super::cluster::Cluster>>,
}

impl FlowControl {
    /// Lanes configured with `defaults`, or a provider's own settings where given.
    pub fn new(defaults: FlowConfig, providers: BTreeMap<String, FlowConfig>) -> Self {
        FlowControl {
            defaults,
            providers,
            lanes: PerModel::default(),
            cluster: None,
        }
    }

    /// Every lane's limits shared with the other instances of `cluster`.
    pub fn with_cluster(mut self, cluster: Arc<super::cluster::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The cluster the lanes' limits are shared with, if any.
    pub fn cluster(&self) -> Option<&Arc<super::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// The settings for `provider`'s lanes.
    pub fn config(&self, provider: &str) -> &FlowConfig {
        self.providers.get(provider).unwrap_or(&self.defaults)
    }

    /// The lane of `provider` / `model`.
    pub fn lane(&self, provider: &str, model: &str) -> Arc<FlowLane> {
        let mut created = false;
        let lane = self.lanes.get(provider, model, || {
            created = true;
            let lane = FlowLane::new(provider, model, self.config(provider).clone());
            match &self.cluster {
                Some(cluster) => lane.keep_shared(cluster.local_share()),
                None => lane,
            }
        });
        if created && let Some(cluster) = &self.cluster {
            cluster.attach(&lane);
        }
        lane
    }

    /// Every lane's state, ordered by provider and model.
    pub fn snapshot(&self) -> Vec<LaneSnapshot> {
        self.lanes.all().iter().map(|l| l.snapshot()).collect()
    }
}
