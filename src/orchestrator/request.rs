//! `Request`: one query and how to run it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::executor::EventSink;
use crate::provider::Turn;
use crate::telemetry::{RequestId, TraceId};

/// A query with per-request options. Built with [`Request::new`] and the `with_*`
/// methods; anything unset takes the orchestrator's configured value.
#[derive(Debug, Clone)]
pub struct Request {
    /// The user's query.
    pub query: String,
    /// Use this trace id (e.g. from an incoming `traceparent`) instead of a new one.
    pub trace_id: Option<TraceId>,
    /// Use this request id instead of a new one. Several requests may share a trace
    /// id (one caller's `traceparent`); each has its own request id.
    pub request_id: Option<RequestId>,
    /// The caller's span id from an incoming `traceparent`: the request's span is its
    /// child in exported traces.
    pub parent_span: Option<u64>,
    /// This request's deadline, instead of the configured `request_timeout`.
    pub timeout: Option<Duration>,
    /// Cancelling this token ends the request at once; unfinished agents are reported
    /// as `timed_out` with kind `cancelled`.
    pub cancel: CancellationToken,
    /// Run only these agents (by id, in config order); `None` runs them all.
    pub agents: Option<Vec<String>>,
    /// Where to send live events (dispatch, retry, each outcome as it lands, the
    /// synthesized answer as it is written).
    pub events: Option<EventSink>,
    /// Earlier turns of the conversation (a chat client's history), oldest first:
    /// every agent and the synthesizer see them before their prompt.
    pub history: Arc<[Turn]>,
    /// The conversation's own instructions (a chat client's system messages): added
    /// after each agent's and the synthesizer's system prompt.
    pub context: Option<String>,
    /// Settings for the synthesizer's call that the caller chose (a chat client's
    /// `max_tokens`, `temperature`, `stop`).
    pub synthesis: SynthesisParams,
}

/// A caller's settings for the synthesizer's call; unset ones keep the config's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SynthesisParams {
    /// Upper bound on the answer's tokens.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Strings that end the answer.
    pub stop: Option<Vec<String>>,
}

impl Request {
    /// A request for `query` with every option at its default.
    pub fn new(query: impl Into<String>) -> Request {
        Request {
            query: query.into(),
            trace_id: None,
            request_id: None,
            parent_span: None,
            timeout: None,
            cancel: CancellationToken::new(),
            agents: None,
            events: None,
            history: Arc::from(Vec::new()),
            context: None,
            synthesis: SynthesisParams::default(),
        }
    }

    /// Gives every agent and the synthesizer the conversation so far: earlier turns,
    /// and the conversation's instructions (added to each system prompt).
    pub fn with_conversation(mut self, history: Vec<Turn>, context: Option<String>) -> Request {
        self.history = Arc::from(history);
        self.context = context.filter(|c| !c.trim().is_empty());
        self
    }

    /// Sets the caller's settings for the synthesizer's call.
    pub fn with_synthesis(mut self, params: SynthesisParams) -> Request {
        self.synthesis = params;
        self
    }

    /// Runs only these agents.
    pub fn with_agents(mut self, agents: Vec<String>) -> Request {
        self.agents = Some(agents);
        self
    }

    /// Sends live events to `events` as the request runs.
    pub fn with_events(mut self, events: EventSink) -> Request {
        self.events = Some(events);
        self
    }

    /// Sets the trace id.
    pub fn with_trace_id(mut self, trace_id: TraceId) -> Request {
        self.trace_id = Some(trace_id);
        self
    }

    /// Sets the request id.
    pub fn with_request_id(mut self, request_id: RequestId) -> Request {
        self.request_id = Some(request_id);
        self
    }

    /// Sets the caller's span id (from `traceparent`), the parent of the request's span.
    pub fn with_parent_span(mut self, parent: u64) -> Request {
        self.parent_span = Some(parent);
        self
    }

    /// Sets the deadline, measured from the start of processing.
    pub fn with_timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the token whose cancellation ends the request.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Request {
        self.cancel = cancel;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), RequestError> {
        if self.query.trim().is_empty() {
            return Err(RequestError::EmptyQuery);
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(RequestError::ZeroTimeout);
        }
        Ok(())
    }
}

/// A request that cannot be run at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The query is empty or only white space.
    #[error(
        "the query is empty; pass the question to ask, e.g. metaorch run \"What are the risks?\""
    )]
    EmptyQuery,
    /// A timeout of zero would time out every agent before it starts.
    #[error("the request timeout is zero; give a positive duration such as 30s")]
    ZeroTimeout,
    /// The request names an agent that is not configured.
    #[error("\"{agent}\" is not a configured agent; configured: {known}")]
    UnknownAgent {
        /// The id asked for.
        agent: String,
        /// The configured ids, comma-separated.
        known: String,
    },
    /// The request asks for no agents at all.
    #[error(
        "the agent list is empty; name at least one agent, or leave the list out to run them all"
    )]
    NoAgents,
}
