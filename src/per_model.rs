//! State kept once per provider and model — a breaker, a retry budget, a flow control
//! lane — created on first use and shared by every caller of that provider and model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A `T` per (provider, model), created on first use.
#[derive(Debug)]
pub(crate) struct PerModel<T> {
    map: Mutex<BTreeMap<(String, String), Arc<T>>>,
}

impl<T> Default for PerModel<T> {
    fn default() -> Self {
        PerModel {
            map: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<T> PerModel<T> {
    /// The `T` of `provider` / `model`, made by `make` the first time.
    pub(crate) fn get(&self, provider: &str, model: &str, make: impl FnOnce() -> T) -> Arc<T> {
        // Only inserts happen under the lock; a panic in one cannot leave it torn.
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry((provider.to_owned(), model.to_owned()))
                .or_insert_with(|| Arc::new(make())),
        )
    }

    /// Every `T` made so far, ordered by provider and model.
    pub(crate) fn all(&self) -> Vec<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
