//! Several instances, one account: each lane's rate limits, cap on calls in flight and
//! `Retry-After` pauses shared through Redis (`[redis]`).
//!
//! Each lane syncs with Redis in a task of its own — one Lua script, one round trip —
//! every 100 ms while it has work, at once when a call waits for a lease, and every
//! third of the lease when idle (to keep its hold and its instance alive). A call
//! never waits on Redis itself: it spends what the last sync leased (see
//! [`super::shared`]). A pause is written to a key with its expiry and published on a
//! channel; every instance subscribes, and each sync also reads the key, so an
//! instance that missed the message still pauses.
//!
//! Rate limits are leased rather than checked per call (a GCRA in Redis per call would
//! add a round trip to every call, and make Redis's latency every call's): measured in
//! BENCHMARKS.md. When Redis cannot be reached, every lane keeps its local share of
//! each limit (`local_share`, or one over the instances last seen), which is logged
//! once and counted, and the shared limits come back at the first sync that works.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;

use super::flow::RateConfig;
use super::lane::FlowLane;
use super::shared::{Granted, HORIZON, Mode, Wants};
use crate::config::RedisConfig;
use crate::redis_link::{LinkError, LuaScript, RedisLink};
use crate::telemetry::metrics;

/// The sync and the pause, called by their SHA-1 (loaded by their text when Redis
/// does not have them).
fn scripts() -> &'static (LuaScript, LuaScript) {
    static SCRIPTS: std::sync::OnceLock<(LuaScript, LuaScript)> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        (
            LuaScript::new(include_str!("cluster/sync.lua")),
            LuaScript::new(include_str!("cluster/pause.lua")),
        )
    })
}

/// How often a lane with work syncs.
const BUSY_EVERY: Duration = Duration::from_millis(100);
/// The least time between two syncs of one lane.
const MIN_GAP: Duration = Duration::from_millis(2);

/// This instance's place among the instances sharing a namespace.
pub struct Cluster {
    link: RedisLink,
    /// This instance's id: host, process and a random part.
    id: String,
    namespace: String,
    lease: Duration,
    local_share: Option<f64>,
    /// The lanes attached, by provider and model, for pauses told by others.
    lanes: Mutex<HashMap<(String, String), Weak<FlowLane>>>,
    /// Whether the last sync failed: changes are logged once each.
    down: AtomicBool,
    subscribed: AtomicBool,
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    /// Why the last sync failed, while Redis is down.
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

/// What `GET /v1/cluster` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    /// This instance's id.
    pub instance: String,
    pub namespace: String,
    /// The server, its credentials hidden.
    pub redis: String,
    /// `shared` (the last sync worked), `local` (Redis cannot be reached: each limit
    /// at this instance's share) or `starting`.
    pub state: &'static str,
    /// Why Redis cannot be used, while it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The instances seen in the last lease, this one included.
    pub instances: Vec<String>,
    /// Each lane's shared limits and what this instance holds of them.
    pub lanes: Vec<LaneShare>,
    /// Syncs with Redis so far, and how many failed.
    pub syncs: u64,
    pub sync_errors: u64,
}

/// One lane's shared limits as this instance sees them.
#[derive(Debug, Clone, Serialize)]
pub struct LaneShare {
    pub provider: String,
    pub model: String,
    pub mode: &'static str,
    /// The shared limits per minute.
    pub rates: RateConfig,
    /// The cap on calls in flight over every instance.
    pub max_in_flight: u32,
    /// The part of it this instance may use now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight_allowed: Option<u32>,
    pub in_flight: u32,
    /// Instances seen at the last sync.
    pub instances: u32,
    /// This instance's share while on its own.
    pub local_share: f64,
}

impl Cluster {
    /// This instance of the namespace in `config`. Does not connect: fails only for a
    /// URL that cannot be used.
    pub fn new(config: &RedisConfig) -> Result<Arc<Cluster>, String> {
        // Back to the shared limits within a lease of Redis's return.
        let link = RedisLink::new(&config.url, config.timeout, "redis.timeout")
            .map_err(|e| e.0)?
            .with_max_pause(config.lease);
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".to_owned());
        let id = format!(
            "{host}-{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        );
        Ok(Arc::new(Cluster {
            link,
            id,
            namespace: config.namespace.clone(),
            lease: config.lease,
            local_share: config.local_share,
            lanes: Mutex::new(HashMap::new()),
            down: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }))
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configured share of each limit kept while Redis cannot be reached.
    pub(crate) fn local_share(&self) -> Option<f64> {
        self.local_share
    }

    /// `{namespace}:flow:{provider}:{model}:{what}`, with `%` and `:` in the names
    /// escaped so that no two lanes share a key.
    fn key(&self, provider: &str, model: &str, what: &str) -> String {
        let escape = |s: &str| s.replace('%', "%25").replace(':', "%3A");
        format!(
            "{}:flow:{}:{}:{what}",
            self.namespace,
            escape(provider),
            escape(model)
        )
    }

    fn channel(&self) -> String {
        format!("{}:flow:pauses", self.namespace)
    }

    /// Makes `lane` keep the shared limits, and starts its sync.
    pub(crate) fn attach(self: &Arc<Self>, lane: &Arc<FlowLane>) {
        let cluster = Arc::downgrade(self);
        let (provider, model) = (lane.provider().to_owned(), lane.model().to_owned());
        lane.connect_shared(
            Box::new(move |wait| {
                if let Some(cluster) = cluster.upgrade() {
                    let (provider, model) = (provider.clone(), model.clone());
                    tokio::spawn(
                        async move { cluster.publish_pause(&provider, &model, wait).await },
                    );
                }
            }),
            {
                let (cluster, lane) = (Arc::downgrade(self), Arc::downgrade(lane));
                Box::new(move || {
                    if let Some(cluster) = cluster.upgrade() {
                        if !cluster.subscribed.swap(true, Ordering::AcqRel) {
                            tokio::spawn(Arc::clone(&cluster).subscribe_loop());
                        }
                        tokio::spawn(cluster.sync_loop(lane));
                    }
                })
            },
        );
        self.lanes_map().insert(
            (lane.provider().to_owned(), lane.model().to_owned()),
            Arc::downgrade(lane),
        );
    }

    fn lanes_map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Weak<FlowLane>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs one lane while it lives.
    async fn sync_loop(self: Arc<Self>, lane: Weak<FlowLane>) {
        loop {
            let Some(strong) = lane.upgrade() else {
                return;
            };
            let Some((wants, busy)) = strong.sync_wants() else {
                return;
            };
            match self.sync(&strong, &wants).await {
                Ok(granted) => {
                    self.up();
                    strong.sync_granted(&wants, &granted);
                }
                Err(e) => {
                    self.failed(&e);
                    strong.sync_failed();
                }
            }
            let busy = busy || wants.units.iter().any(|u| *u > 0) || wants.in_flight > 0;
            let next = if self.down.load(Ordering::Acquire) {
                // The link leaves a failing server alone for a while by itself.
                self.lease / 3
            } else if busy {
                BUSY_EVERY
            } else {
                self.lease / 3
            };
            tokio::time::sleep(MIN_GAP).await;
            let wanted = strong.sync_wanted().notified();
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = wanted => {}
            }
        }
    }

    /// One round trip: the lane's leases, its hold on calls in flight, the pause.
    async fn sync(&self, lane: &FlowLane, wants: &Wants) -> Result<Granted, LinkError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let (p, m) = (lane.provider(), lane.model());
        let keys = [
            format!("{}:cluster:instances", self.namespace),
            self.key(p, m, "rpm"),
            self.key(p, m, "tpm"),
            self.key(p, m, "input_tpm"),
            self.key(p, m, "output_tpm"),
            self.key(p, m, "in_flight"),
            self.key(p, m, "pause"),
        ];
        let reply: Vec<i64> = self
            .link
            .call_script(&scripts().0, |cmd| {
                cmd.arg(keys.len()).arg(&keys[..]);
                cmd.arg(&self.id)
                    .arg(self.lease.as_millis() as u64)
                    .arg(HORIZON.as_millis() as u64);
                for limit in wants.limits {
                    cmd.arg(limit);
                }
                for units in wants.units {
                    cmd.arg(units);
                }
                cmd.arg(wants.cap)
                    .arg(wants.cap_wanted)
                    .arg(wants.in_flight);
            })
            .await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        if reply.len() < 11 {
            return Err(LinkError(format!(
                "redis {}: the sync script answered {} values, expected 11",
                self.link.shown_url(),
                reply.len()
            )));
        }
        let pause = at(10);
        Ok(Granted {
            instances: u32::try_from(at(0)).unwrap_or(u32::MAX),
            units: [at(1), at(3), at(5), at(7)],
            starts: [2, 4, 6, 8].map(|i| Duration::from_micros(at(i))),
            cap: u32::try_from(at(9)).unwrap_or(u32::MAX),
            pause: (pause > 0).then(|| Duration::from_millis(pause)),
        })
    }

    /// Tells every instance that `provider` / `model` is paused for `wait`.
    async fn publish_pause(&self, provider: &str, model: &str, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let message = serde_json::json!({
            "from": self.id,
            "provider": provider,
            "model": model,
            "ms": ms,
        })
        .to_string();
        let keys = [self.key(provider, model, "pause"), self.channel()];
        let told = self.link.call_script::<i64>(&scripts().1, |cmd| {
            cmd.arg(keys.len()).arg(&keys[..]).arg(ms).arg(&message);
        });
        // Down, the pause stays this instance's: the others find out from their
        // own 429s, as without Redis.
        let _ = told.await;
    }

    /// Listens for the other instances' pauses, reconnecting while the cluster lives.
    async fn subscribe_loop(self: Arc<Self>) {
        let me = Arc::downgrade(&self);
        let (client, channel, timeout) = (self.link.client().clone(), self.channel(), self.lease);
        drop(self);
        loop {
            let connected = tokio::time::timeout(timeout, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            if let Ok(Ok(mut pubsub)) = connected {
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Some(cluster) = me.upgrade() else {
                        return;
                    };
                    if let Ok(text) = message.get_payload::<String>() {
                        cluster.told(&text);
                    }
                }
            }
            if me.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Another instance's pause, as published: `{"from", "provider", "model", "ms"}`.
    fn told(&self, text: &str) {
        #[derive(serde::Deserialize)]
        struct Told {
            from: String,
            provider: String,
            model: String,
            ms: u64,
        }
        let Ok(told) = serde_json::from_str::<Told>(text) else {
            return;
        };
        if told.from == self.id {
            return;
        }
        let lane = self
            .lanes_map()
            .get(&(told.provider, told.model))
            .and_then(Weak::upgrade);
        if let Some(lane) = lane {
            let wait = Duration::from_millis(told.ms).min(crate::resilience::MAX_PAUSE);
            lane.pause_here(wait, "another instance's Retry-After");
        }
    }

    fn up(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            metrics::cluster_mode(true);
            tracing::warn!(
                event = "cluster.shared",
                redis = %self.link.shown_url(),
                namespace = %self.namespace,
                "redis {} is back: limits shared with the other instances again",
                self.link.shown_url()
            );
        }
        metrics::cluster_sync(true);
    }

    fn failed(&self, error: &LinkError) {
        self.sync_errors.fetch_add(1, Ordering::Relaxed);
        metrics::cluster_sync(false);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.0.clone());
        if !self.down.swap(true, Ordering::AcqRel) {
            metrics::cluster_mode(false);
            tracing::warn!(
                event = "cluster.local",
                redis = %self.link.shown_url(),
                namespace = %self.namespace,
                error.message = %error.0,
                "{error}; this instance keeps {} of each shared limit until redis answers again (said once)",
                match self.local_share {
                    Some(share) => format!("{share} (redis.local_share)"),
                    None => "its share (one over the instances last seen; set redis.local_share to fix it)".to_owned(),
                }
            );
        }
    }

    /// The cluster as this instance sees it; asks Redis for the instances alive.
    pub async fn snapshot(&self) -> ClusterSnapshot {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(format!("{}:cluster:instances", self.namespace))
            .arg(0)
            .arg(-1);
        let instances: Vec<String> = self.link.call(&cmd).await.unwrap_or_default();
        let lanes: Vec<Arc<FlowLane>> = self
            .lanes_map()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut shares: Vec<LaneShare> = lanes
            .iter()
            .filter_map(|lane| {
                let (mode, allowed, instances, local_share) = lane.shared_snapshot()?;
                let snap = lane.snapshot();
                Some(LaneShare {
                    provider: snap.provider,
                    model: snap.model,
                    mode: mode_name(mode),
                    rates: snap.rates,
                    max_in_flight: lane.config().concurrency.max,
                    in_flight_allowed: allowed,
                    in_flight: snap.in_flight,
                    instances,
                    local_share,
                })
            })
            .collect();
        shares.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        let down = self.down.load(Ordering::Acquire);
        let started = self.syncs.load(Ordering::Relaxed) > 0;
        ClusterSnapshot {
            instance: self.id.clone(),
            namespace: self.namespace.clone(),
            redis: self.link.shown_url().to_owned(),
            state: match (started, down) {
                (false, _) => "starting",
                (true, true) => "local",
                (true, false) => "shared",
            },
            error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            instances,
            lanes: shares,
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_errors: self.sync_errors.load(Ordering::Relaxed),
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Starting => "starting",
        Mode::Shared => "shared",
        Mode::Local => "local",
    }
}
