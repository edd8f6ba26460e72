//! The `Provider` trait: one LLM call, nothing more.
//!
//! A provider turns a [`CompletionRequest`] into a [`Completion`] or a classified
//! [`ProviderError`]. It knows its wire format and nothing about retries, limits or
//! deadlines: those belong to the layers above it, so a provider never retries on its
//! own and never sleeps except to do its job (the `sim` provider's simulated latency).

mod account;
mod anthropic;
mod client;
mod error;
mod http;
mod openai;
pub mod retry_after;
mod sim;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

pub use account::{
    Account, AccountLimits, AccountPermit, AccountRejection, AccountState, BucketState, LimitedBy,
};
pub use anthropic::{ANTHROPIC_BASE_URL, ANTHROPIC_VERSION, AnthropicOptions, AnthropicProvider};
pub use client::{CA_FILE_VARIABLE, ca_file_problem, proxy_problem};
pub use error::{ErrorKind, ProviderError};
pub use http::{
    H2_CONNECTION_WINDOW, H2_KEEP_ALIVE, H2_STREAM_WINDOW, Http2, MAX_ERROR_BODY_BYTES,
    MAX_RESPONSE_BYTES, POOL_IDLE_TIMEOUT, RateLimits, Secret,
};
pub use openai::{MaxTokensField, OPENAI_BASE_URL, OpenAiOptions, OpenAiProvider};
pub use sim::{ScriptedFault, SimFault, SimFaults, SimOptions, SimProvider};

/// One call to a language model, fully rendered.
#[derive(Debug, Clone, Default)]
pub struct CompletionRequest {
    /// The model name the provider should use.
    pub model: String,
    /// The system prompt (the agent's role), if any.
    pub system: Option<String>,
    /// Earlier turns of the conversation, oldest first, before [`Self::prompt`] (a chat
    /// client's history). Shared by every agent of a request, so cheap to clone.
    pub history: Arc<[Turn]>,
    /// The user message: the agent's prompt template with the query filled in.
    pub prompt: String,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature, if the agent sets one.
    pub temperature: Option<f32>,
    /// Strings that end generation when produced.
    pub stop_sequences: Vec<String>,
    /// Ask for the reply as a stream of events (providers that can).
    pub stream: bool,
    /// Mark the system prompt as a prompt-cache breakpoint, for providers whose cache
    /// is opt-in (Anthropic): calls that share it then read it from the cache.
    pub prompt_cache: bool,
    /// Where a streamed reply's text goes as it arrives, if anyone listens.
    pub deltas: Option<DeltaSink>,
    /// Who is asking, for providers that propagate or key on it.
    pub meta: RequestMeta,
}

/// Who spoke a turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

impl Speaker {
    /// The role's name on the wire (`user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::User => "user",
            Speaker::Assistant => "assistant",
        }
    }
}

/// One earlier turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Turn {
    /// Who said it.
    pub role: Speaker,
    /// What was said.
    pub content: String,
}

/// A piece of a streamed reply, as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Delta<'a> {
    /// The attempt it belongs to (from [`RequestMeta::attempt`]): text from an attempt
    /// that then failed is superseded by the next attempt's.
    pub attempt: u32,
    /// The model that is writing it.
    pub model: &'a str,
    /// The new text.
    pub text: &'a str,
}

/// Receives a streamed reply's text as it arrives. Called on the provider's task:
/// it must not block.
#[derive(Clone)]
pub struct DeltaSink(Arc<dyn Fn(Delta<'_>) + Send + Sync>);

impl DeltaSink {
    /// A sink calling `f` with each piece.
    pub fn new(f: impl Fn(Delta<'_>) + Send + Sync + 'static) -> Self {
        DeltaSink(Arc::new(f))
    }

    /// Passes one piece of `request`'s reply on.
    pub fn send(&self, request: &CompletionRequest, text: &str) {
        if !text.is_empty() {
            (self.0)(Delta {
                attempt: request.meta.attempt,
                model: &request.model,
                text,
            });
        }
    }
}

impl std::fmt::Debug for DeltaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeltaSink")
    }
}

/// Context a provider may propagate (e.g. as a `traceparent` header) or key on.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// The request's trace id, 32 lowercase hex digits.
    pub trace_id: String,
    /// The agent making the call.
    pub agent_id: String,
    /// 1 for the first try, 2 for the first retry, …
    pub attempt: u32,
}

/// What a provider returns for a successful call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// The generated text.
    pub text: String,
    /// Why generation stopped (`end_turn`, `max_tokens`, …), as the provider says it.
    pub stop_reason: Option<String>,
    /// Token counts as the provider reports them.
    pub usage: Usage,
    /// Time spent inside the provider call, as the provider measured it.
    pub latency: Duration,
    /// The provider's id for the request (`request-id`), for support tickets.
    pub request_id: Option<String>,
    /// The rate limit state the provider reported, if any. Boxed, as in
    /// [`ProviderError`]: a completion is held in every call's state, and most carry none.
    pub rate_limits: Option<Box<RateLimits>>,
}

/// Token counts of one call, or summed over several.
///
/// Input is counted in three parts that add up to the prompt, as Anthropic reports it
/// and each provider normalises to: tokens neither written to nor read from a prompt
/// cache, tokens written to it, tokens read from it. Each part has its own price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Input tokens read by the model, the cache's parts aside.
    pub input_tokens: u64,
    /// Tokens generated by the model.
    pub output_tokens: u64,
    /// Input tokens written to the provider's prompt cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the provider's prompt cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_read_input_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl std::ops::AddAssign for Usage {
    /// Sums saturating: counts come from upstreams, and a nonsense one must not panic.
    fn add_assign(&mut self, rhs: Usage) {
        self.input_tokens = self.input_tokens.saturating_add(rhs.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(rhs.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(rhs.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(rhs.cache_read_input_tokens);
    }
}

impl Usage {
    /// Input and output tokens together, saturating.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Every input token, the prompt cache's included, saturating: the prompt's size.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }
}

/// An LLM backend: the built-in simulator, Anthropic's Messages API, or any
/// OpenAI-compatible server.
///
/// Implementations must be cheap to share (`Arc<dyn Provider>`) and safe to call from
/// many tasks at once. Dropping the returned future cancels the call.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// A short name for logs and outcomes, such as `sim` or `anthropic`.
    fn kind(&self) -> &'static str;

    /// Who answers, for the response cache's key: the kind and where it is (its base
    /// URL, its seed), never its credentials. Two providers with the same identity
    /// answer the same request the same way.
    fn identity(&self) -> String {
        self.kind().to_owned()
    }

    /// Performs one call. Never retries: a failure is classified and returned.
    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError>;
}
