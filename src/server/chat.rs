//! `POST /v1/chat/completions`: the orchestrator as an OpenAI model. `model` is
//! `metaorch` (every agent) or `metaorch/<agent>+<agent>…` (a subset); the last user
//! message is the query, the turns before it the conversation every agent and the
//! synthesizer see, system messages their added instructions; `max_tokens`,
//! `temperature` and `stop` apply to the synthesizer. The answer is the assistant's
//! message; `usage` sums every call of the request. `stream: true` sends the
//! synthesizer's text as it is written, in chunks ending with `[DONE]`. Tools, several
//! choices and other features metaorch does not offer are refused by name.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::{json_body, parse};
use super::orchestrate::prepare;
use super::running::RunningRequest;
use super::{ApiError, ServerState, redact};
use crate::executor::AgentEvent;
use crate::orchestrator::{Request, Response as Answer, SynthesisParams};
use crate::provider::{Speaker, Turn};

/// The model name the orchestrator answers to.
const MODEL: &str = "metaorch";

#[derive(Deserialize)]
struct Body {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    /// Features metaorch does not offer: present (and not their "off" value), they
    /// are refused by name rather than ignored.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    audio: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A chat request as the orchestrator takes it.
struct Conversation {
    /// The last user message.
    query: String,
    /// The turns before it.
    history: Vec<Turn>,
    /// The system (and developer) messages, joined.
    context: Option<String>,
}

impl Body {
    /// Refuses, by name, what metaorch does not do; checks the sampling settings.
    fn check(&self) -> Result<SynthesisParams, ApiError> {
        let unsupported = |field: &str, what: &str| {
            Err(ApiError::bad_request(
                format!(
                    "{field}: {what} is not supported here; metaorch answers with text from its agents and synthesizer"
                ),
                Some(field),
            ))
        };
        let off = |v: &Option<Value>, allowed: &[&str]| match v {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::String(s)) => allowed.contains(&s.as_str()),
            Some(Value::Object(o)) => o
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| allowed.contains(&t)),
            Some(_) => false,
        };
        if !off(&self.tools, &[]) {
            return unsupported("tools", "tool calling");
        }
        if !off(&self.tool_choice, &["none", "auto"]) {
            return unsupported("tool_choice", "tool calling");
        }
        if !off(&self.functions, &[]) {
            return unsupported("functions", "function calling");
        }
        if !off(&self.function_call, &["none", "auto"]) {
            return unsupported("function_call", "function calling");
        }
        if !off(&self.response_format, &["text"]) {
            return unsupported("response_format", "a structured response format");
        }
        if self.logprobs == Some(true) {
            return unsupported("logprobs", "log probabilities");
        }
        if !off(&self.audio, &[]) {
            return unsupported("audio", "audio output");
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_request(
                format!(
                    "n: {n} choices asked for; metaorch gives one answer, so n must be 1 or absent"
                ),
                Some("n"),
            ));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(0), _) => Some(("max_completion_tokens", 0)),
            (None, Some(0)) => Some(("max_tokens", 0)),
            _ => None,
        };
        if let Some((field, _)) = max_tokens {
            return Err(ApiError::bad_request(
                format!("{field}: 0 leaves no room for an answer; expected 1 or more"),
                Some(field),
            ));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::bad_request(
                format!("temperature: {t} is out of range; expected 0 to 2"),
                Some("temperature"),
            ));
        }
        let stop = match &self.stop {
            None => None,
            Some(Stop::One(s)) => Some(vec![s.clone()]),
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(ApiError::bad_request(
                    format!("stop: {} sequences given; at most 4", v.len()),
                    Some("stop"),
                ));
            }
            Some(Stop::Many(v)) => Some(v.clone()),
        };
        Ok(SynthesisParams {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            stop: stop.filter(|s| !s.is_empty()),
        })
    }

    /// The last user message is the query; the user and assistant turns before it
    /// are the history; system and developer messages are the context.
    fn conversation(&self) -> Result<Conversation, ApiError> {
        let mut context = Vec::new();
        let mut turns = Vec::new();
        for (i, message) in self.messages.iter().enumerate() {
            let text = message.text(i)?;
            match message.role.as_str() {
                "system" | "developer" => context.extend(text),
                "user" => turns.push(Turn {
                    role: Speaker::User,
                    content: text.unwrap_or_default(),
                }),
                "assistant" => turns.push(Turn {
                    role: Speaker::Assistant,
                    content: text.unwrap_or_default(),
                }),
                other => {
                    let field = format!("messages[{i}].role");
                    return Err(ApiError::bad_request(
                        format!(
                            "{field}: \"{other}\" is not supported here; expected system, developer, user or assistant (metaorch offers no tools)"
                        ),
                        Some(&field),
                    ));
                }
            }
        }
        let Some(last_user) = turns.iter().rposition(|t| t.role == Speaker::User) else {
            return Err(ApiError::bad_request(
                "messages: there is no user message to answer",
                Some("messages"),
            ));
        };
        // Turns after the last user message (an assistant prefill) are not kept.
        turns.truncate(last_user + 1);
        let query = turns.pop().map(|t| t.content).unwrap_or_default();
        Ok(Conversation {
            query,
            history: turns,
            context: (!context.is_empty()).then(|| context.join("\n\n")),
        })
    }
}

impl Message {
    /// The message's text; parts other than text are refused by name.
    fn text(&self, i: usize) -> Result<Option<String>, ApiError> {
        match &self.content {
            None => Ok(None),
            Some(Content::Text(t)) => Ok(Some(t.clone())),
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_deref(), &part.text) {
                        (Some("text") | None, Some(text)) => texts.push(text.as_str()),
                        (kind, _) => {
                            let field = format!("messages[{i}].content[{j}]");
                            return Err(ApiError::bad_request(
                                format!(
                                    "{field}: a part of type \"{}\" is not supported here; send text",
                                    kind.unwrap_or("(none)")
                                ),
                                Some(&field),
                            ));
                        }
                    }
                }
                Ok(Some(texts.join("\n")))
            }
        }
    }
}

pub(super) async fn completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let admission = state.admit()?;
    let body: Body = parse(&json_body(&headers, body)?)?;
    let agents = agents_of(&body.model)?;
    let params = body.check()?;
    let conversation = body.conversation()?;
    let mut request = Request::new(conversation.query)
        .with_conversation(conversation.history, conversation.context)
        .with_synthesis(params);
    if let Some(agents) = agents {
        request = request.with_agents(agents);
    }
    let (request, ids) = prepare(&state, &headers, request)?;
    let id = format!("chatcmpl-{}{}", ids.trace_id, ids.request_id);
    let created = now();
    let model = body.model.clone();

    if !body.stream {
        let running = RunningRequest::spawn(&state, request, admission);
        let answer = redact::response(running.finish().await?);
        if !answer.ok {
            return Err(too_few(&answer));
        }
        let completion = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.answer, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason(&answer)
            }],
            "usage": usage(&answer),
            "system_fingerprint": null
        });
        return Ok(ids.on(Json(completion).into_response()));
    }

    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The stream holds the running request: if the client goes away and the stream
    // is dropped, the request is cancelled and ends as `cancelled`.
    let running = RunningRequest::spawn(&state, request.with_events(tx), admission);
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    let stream = Streaming {
        events: rx,
        running: Some(running),
        chunk: Box::new(chunk),
        sent: String::new(),
        writer: None,
        restarted: false,
        include_usage,
        tail: Vec::new(),
    };
    let head = stream::iter([Ok::<_, Infallible>(data(&first))]);
    let body = stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok(event), s))
    });
    let sse = Sse::new(head.chain(body)).keep_alive(KeepAlive::default());
    Ok(ids.on(sse.into_response()))
}

type Chunk = Box<dyn Fn(Value, Value) -> Value + Send>;

/// A streamed chat completion: the synthesizer's text as content chunks as it is
/// written, then the finish chunk, the usage chunk if asked, and `[DONE]`.
struct Streaming {
    events: tokio::sync::mpsc::UnboundedReceiver<AgentEvent>,
    running: Option<RunningRequest>,
    chunk: Chunk,
    /// The content sent so far.
    sent: String,
    /// The attempt and model whose text is being forwarded.
    writer: Option<(u32, String)>,
    /// An attempt that had sent text failed: later text is held for the end.
    restarted: bool,
    /// Send a last chunk with the usage (`stream_options.include_usage`).
    include_usage: bool,
    /// What is left to send once the request is done.
    tail: Vec<Event>,
}

impl Streaming {
    async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.tail.pop() {
            return Some(event);
        }
        while let Some(event) = self.events.recv().await {
            if let AgentEvent::SynthesisDelta {
                attempt,
                model,
                text,
            } = event
            {
                let this = (attempt, model);
                if self.writer.as_ref().is_some_and(|w| *w != this) && !self.sent.is_empty() {
                    // Sent text cannot be taken back: the rest comes at the end.
                    self.restarted = true;
                }
                self.writer = Some(this);
                if !self.restarted {
                    self.sent.push_str(&text);
                    return Some(data(&(self.chunk)(json!({ "content": text }), Value::Null)));
                }
            }
        }
        let running = self.running.take()?;
        let mut tail = Vec::new();
        match running.finish().await.map(redact::response) {
            Ok(answer) if answer.ok => {
                // What the stream has not said yet: all of it when nothing streamed,
                // the rest when the answer goes on from what was sent, and the whole
                // answer after a break when a failed attempt had sent something else.
                let rest = match answer.answer.strip_prefix(self.sent.as_str()) {
                    Some(rest) => rest.to_owned(),
                    None => format!("\n\n{}", answer.answer),
                };
                if !rest.is_empty() {
                    tail.push(data(&(self.chunk)(json!({ "content": rest }), Value::Null)));
                }
                tail.push(data(&(self.chunk)(json!({}), json!(finish_reason(&answer)))));
                if self.include_usage {
                    let mut last = (self.chunk)(json!({}), Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = usage(&answer);
                    tail.push(data(&last));
                }
            }
            Ok(answer) => tail.push(data(&json!({"error": error_body(&answer)}))),
            Err(e) => tail.push(data(&json!({"error": {"type": "server_error", "message": e.message(), "param": null, "code": null}}))),
        }
        tail.push(Event::default().data("[DONE]"));
        tail.reverse();
        self.tail = tail;
        self.tail.pop()
    }
}

pub(super) async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "metaorch"}]
    }))
}

/// `metaorch` → every agent; `metaorch/a+b` → agents a and b.
fn agents_of(model: &str) -> Result<Option<Vec<String>>, ApiError> {
    if model == MODEL {
        return Ok(None);
    }
    if let Some(profile) = model.strip_prefix("metaorch/")
        && !profile.is_empty()
    {
        return Ok(Some(profile.split('+').map(str::to_owned).collect()));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "model: \"{model}\" is not served here; use \"metaorch\" (every agent) or \"metaorch/<agent>+<agent>\""
        ),
    ))
}

/// `length` when the synthesizer ran out of tokens, `stop` otherwise.
fn finish_reason(answer: &Answer) -> &'static str {
    let stop = answer
        .synthesis
        .report()
        .filter(|r| r.fallback.is_none())
        .and_then(|r| r.stop_reason.as_deref());
    match stop {
        Some("max_tokens" | "length") => "length",
        _ => "stop",
    }
}

/// OpenAI's usage object over every call of the request: `prompt_tokens` counts the
/// whole prompt, cached parts included (`prompt_tokens_details.cached_tokens` says how
/// many were read from a cache); `cost_usd` is metaorch's own addition.
fn usage(answer: &Answer) -> Value {
    let tokens = answer.usage.tokens();
    let prompt = tokens.prompt_tokens();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": tokens.output_tokens,
        "total_tokens": prompt.saturating_add(tokens.output_tokens),
        "prompt_tokens_details": {"cached_tokens": tokens.cache_read_input_tokens},
        "cost_usd": answer.usage.cost_usd
    })
}

fn error_body(answer: &Answer) -> Value {
    json!({
        "type": "server_error",
        "message": format!(
            "{} of {} agents succeeded, fewer than the {} required (trace {})",
            answer.summary.succeeded,
            answer.outcomes.len(),
            answer.summary.min_successes,
            answer.trace_id
        ),
        "param": null,
        "code": "too_few_agents"
    })
}

fn too_few(answer: &Answer) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        error_body(answer)["message"]
            .as_str()
            .unwrap_or("too few agents succeeded"),
    )
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
