//! The in-process store: moka's concurrent cache, bounded by entries and bytes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{CacheError, CacheKey, CacheStore, CachedReply};

/// Replies in this process's memory, bounded: at most `max_entries` replies and
/// `max_bytes` of them, least recently and least often used evicted first. Expiry is
/// checked against tokio's clock when read (so a paused clock in tests governs it),
/// and moka's own time to live reclaims what is never read again.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    cache: moka::future::Cache<CacheKey, Arc<Entry>>,
}

#[derive(Debug)]
struct Entry {
    reply: CachedReply,
    expires: Instant,
}

impl MemoryStore {
    /// A store of at most `max_entries` replies and `max_bytes` bytes, whose entries
    /// moka drops `max_ttl` after they were written.
    pub fn new(max_entries: u64, max_bytes: u64, max_ttl: Duration) -> Self {
        // Each entry weighs at least max_bytes / max_entries: the byte bound then
        // also bounds the number of entries.
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes.max(1))
            .weigher(move |_key: &CacheKey, entry: &Arc<Entry>| -> u32 {
                let weight = (entry.reply.weight() as u64).max(floor);
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .time_to_live(max_ttl.max(Duration::from_secs(1)))
            .build();
        MemoryStore { cache }
    }

    /// Replies held now (moka's count, which lags writes slightly).
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<CachedReply>, CacheError> {
        match self.cache.get(key).await {
            Some(entry) if entry.expires > Instant::now() => Ok(Some(entry.reply.clone())),
            Some(_) => {
                self.cache.invalidate(key).await;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(
        &self,
        key: &CacheKey,
        reply: &CachedReply,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let expires = crate::time::later(Instant::now(), ttl);
        self.cache
            .insert(
                *key,
                Arc::new(Entry {
                    reply: reply.clone(),
                    expires,
                }),
            )
            .await;
        Ok(())
    }
}
