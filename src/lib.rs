//! metaorch: a meta-orchestrator for LLM sub-agents.
//!
//! A query fans out to several sub-agents — LLM calls, each with its own role, prompt,
//! model and provider — in parallel under a concurrency limit shared by the whole
//! process and a per-request deadline. Exactly one outcome comes back per agent,
//! whatever happens (error, timeout, panic), and the successful replies are
//! synthesized into one answer under one trace id.
//!
//! The request's path, top-down: [`orchestrator`] → [`executor`] → [`provider`], with
//! [`limits`] bounding calls in flight, [`resilience`] guarding every call (retry,
//! retry budget, circuit breakers, timeouts), [`config`] describing it all,
//! [`cost`] pricing each call in US dollars and [`telemetry`] naming each request.
//!
//! See [`Orchestrator`] for an example.

pub mod cache;
pub mod config;
pub mod cost;
pub mod executor;
pub mod limits;
pub mod mock_upstream;
pub mod orchestrator;
mod outcome;
mod per_model;
pub mod provider;
mod redis_link;
pub mod resilience;
pub mod server;
pub mod telemetry;
mod time;

pub use config::Config;
pub use executor::{AgentOutcome, OutcomeStatus};
pub use orchestrator::{Orchestrator, Request, Response};
