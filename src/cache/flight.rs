//! Single-flight: identical calls in flight at the same time in this process share one
//! upstream call. The first is the leader; the others wait for its result — success or
//! error, after the leader's own retries — and are never retried on their own. If the
//! leader goes away first (its request cancelled), a waiter takes over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

use super::{CacheKey, CachedReply};
use crate::outcome::OutcomeError;

/// What a leader's call came to.
pub type FlightResult = Result<CachedReply, OutcomeError>;

/// The calls in flight, by key.
#[derive(Debug, Clone, Default)]
pub struct SingleFlight {
    flights: Arc<Mutex<HashMap<CacheKey, Weak<Shared>>>>,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<State>,
}

#[derive(Debug, Clone)]
enum State {
    Pending,
    Done(Arc<FlightResult>),
    /// The leader went away without a result.
    Abandoned,
}

/// What joining a key gave.
#[derive(Debug)]
pub enum Joined {
    /// Nobody was making this call: the caller makes it and reports through the flight.
    Lead(Flight),
    /// An identical call in flight finished: its result.
    Done(Arc<FlightResult>),
}

/// A leader's duty: report the call's result with [`Flight::finish`]. Dropped without
/// a result (the leader cancelled), it lets a waiter take over.
#[derive(Debug)]
pub struct Flight {
    key: CacheKey,
    shared: Arc<Shared>,
    flights: SingleFlight,
    finished: bool,
}

impl SingleFlight {
    /// Leads the call for `key`, or waits for the one in flight.
    pub async fn join(&self, key: &CacheKey) -> Joined {
        loop {
            let mut waiting = {
                let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
                match flights.get(key).and_then(Weak::upgrade) {
                    Some(shared) => shared.state.subscribe(),
                    None => {
                        let (state, _) = watch::channel(State::Pending);
                        let shared = Arc::new(Shared { state });
                        flights.insert(*key, Arc::downgrade(&shared));
                        return Joined::Lead(Flight {
                            key: *key,
                            shared,
                            flights: self.clone(),
                            finished: false,
                        });
                    }
                }
            };
            // Until the leader reports or goes away; then lead, or join the new leader.
            let state = waiting
                .wait_for(|s| !matches!(s, State::Pending))
                .await
                .map(|s| s.clone());
            if let Ok(State::Done(result)) = state {
                return Joined::Done(result);
            }
        }
    }

    /// Calls in flight now.
    pub fn len(&self) -> usize {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, key: &CacheKey, shared: &Arc<Shared>) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights
            .get(key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(shared)))
        {
            flights.remove(key);
        }
    }
}

impl Flight {
    /// Hands the call's result to every waiter.
    pub fn finish(mut self, result: FlightResult) {
        self.finished = true;
        self.flights.remove(&self.key, &self.shared);
        self.shared
            .state
            .send_replace(State::Done(Arc::new(result)));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.finished {
            self.flights.remove(&self.key, &self.shared);
            self.shared.state.send_replace(State::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::FailureKind;
    use crate::provider::{CompletionRequest, ErrorKind};

    fn key(n: u32) -> CacheKey {
        CacheKey::of(
            "test",
            &CompletionRequest {
                max_tokens: n,
                ..CompletionRequest::default()
            },
        )
    }

    fn reply(text: &str) -> CachedReply {
        CachedReply {
            text: text.into(),
            stop_reason: None,
            usage: Default::default(),
        }
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_result_and_the_flight_ends() {
        let flights = SingleFlight::default();
        let Joined::Lead(leader) = flights.join(&key(1)).await else {
            panic!("the first leads");
        };
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let flights = flights.clone();
                tokio::spawn(async move { flights.join(&key(1)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        // Another key is another flight.
        assert!(matches!(flights.join(&key(2)).await, Joined::Lead(_)));
        leader.finish(Ok(reply("r")));
        for w in waiters {
            match w.await.unwrap() {
                Joined::Done(result) => assert_eq!(result.as_ref().as_ref().unwrap().text, "r"),
                Joined::Lead(_) => panic!("a waiter led while the leader was alive"),
            }
        }
        assert!(flights.is_empty());
        // Errors are shared too.
        let Joined::Lead(leader) = flights.join(&key(1)).await else {
            panic!("a new flight");
        };
        let waiter = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.join(&key(1)).await })
        };
        tokio::task::yield_now().await;
        leader.finish(Err(OutcomeError {
            kind: FailureKind::Provider(ErrorKind::Server),
            status: Some(500),
            message: "down".into(),
        }));
        let Joined::Done(result) = waiter.await.unwrap() else {
            panic!("the waiter gets the error");
        };
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_waiter_takes_over_when_the_leader_goes_away() {
        let flights = SingleFlight::default();
        let Joined::Lead(leader) = flights.join(&key(1)).await else {
            panic!("the first leads");
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let flights = flights.clone();
                tokio::spawn(async move {
                    match flights.join(&key(1)).await {
                        Joined::Lead(flight) => {
                            // A call takes time: the other waiters join this flight
                            // before it reports.
                            tokio::task::yield_now().await;
                            flight.finish(Ok(reply("taken over")));
                            "led"
                        }
                        Joined::Done(_) => "waited",
                    }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(leader);
        let mut roles = Vec::new();
        for w in waiters {
            roles.push(w.await.unwrap());
        }
        roles.sort_unstable();
        assert_eq!(roles, ["led", "waited", "waited"]);
        assert!(flights.is_empty());
    }
}
