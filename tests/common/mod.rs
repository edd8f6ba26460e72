//! Providers with scripted behaviour, for tests that need an agent to fail, hang, panic
//! or be counted. They implement the same `Provider` trait as the real ones.

#![allow(dead_code)] // each test binary uses a different subset

pub mod redis;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use metaorch::executor::AgentTask;
use metaorch::provider::{
    Completion, CompletionRequest, ErrorKind, Provider, ProviderError, RequestMeta, Usage,
};

/// What a scripted agent does when called.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Replies after this long.
    Reply(Duration),
    /// Fails after this long with this error.
    Fail(Duration, ProviderError),
    /// Panics at once.
    Panic(&'static str),
    /// Never answers.
    Hang,
    /// Fails attempts 1 to N with this error at once, then replies at once.
    FailFirst(u32, ProviderError),
}

/// Looks up each call's behaviour by agent id.
#[derive(Debug, Default)]
pub struct Scripted {
    behaviours: HashMap<String, Behaviour>,
    pub calls: AtomicUsize,
}

impl Scripted {
    pub fn new(pairs: &[(&str, Behaviour)]) -> Self {
        Scripted {
            behaviours: pairs
                .iter()
                .map(|(id, b)| ((*id).to_owned(), b.clone()))
                .collect(),
            calls: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Provider for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let behaviour = self
            .behaviours
            .get(&request.meta.agent_id)
            .cloned()
            .unwrap_or(Behaviour::Reply(Duration::ZERO));
        match behaviour {
            Behaviour::Reply(latency) => {
                tokio::time::sleep(latency).await;
                Ok(reply(request, latency))
            }
            Behaviour::Fail(latency, error) => {
                tokio::time::sleep(latency).await;
                Err(error)
            }
            Behaviour::Panic(message) => panic!("{message}"),
            Behaviour::Hang => std::future::pending().await,
            Behaviour::FailFirst(n, error) if request.meta.attempt <= n => Err(error),
            Behaviour::FailFirst(..) => Ok(reply(request, Duration::ZERO)),
        }
    }
}

/// Fails (with a 503) while `failing` is set, replies otherwise; counts calls.
#[derive(Debug, Default)]
pub struct Toggle {
    pub failing: std::sync::atomic::AtomicBool,
    pub calls: AtomicUsize,
}

#[async_trait]
impl Provider for Toggle {
    fn kind(&self) -> &'static str {
        "toggle"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            Err(ProviderError::new(ErrorKind::Server, "unavailable").with_status(503))
        } else {
            Ok(reply(request, Duration::ZERO))
        }
    }
}

/// Log lines written by `tracing`, in the product's JSON format.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// The process-wide capture: installed once as the global subscriber, at TRACE
    /// level, for every thread of the test binary. Tests pick out their own lines by
    /// trace id.
    pub fn global() -> &'static Capture {
        use tracing_subscriber::layer::SubscriberExt;
        static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
        CAPTURE.get_or_init(|| {
            let capture = Capture::default();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new("trace"))
                .with(metaorch::telemetry::JsonLayer::new(capture.clone()));
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            capture
        })
    }

    /// The raw text captured so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The lines captured so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    /// The lines of one request.
    pub fn trace(&self, trace_id: &str) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["trace_id"] == trace_id)
            .collect()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Replies after a fixed latency and records the most calls it ever saw in flight.
#[derive(Debug)]
pub struct InFlightCounter {
    latency: Duration,
    now: AtomicUsize,
    pub max: AtomicUsize,
    pub calls: AtomicUsize,
}

impl InFlightCounter {
    pub fn new(latency: Duration) -> Self {
        InFlightCounter {
            latency,
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Provider for InFlightCounter {
    fn kind(&self) -> &'static str {
        "counter"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let in_flight = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(in_flight, Ordering::SeqCst);
        // Yield even at zero latency, so that calls really overlap.
        tokio::time::sleep(self.latency).await;
        tokio::task::yield_now().await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(reply(request, self.latency))
    }
}

pub fn reply(request: &CompletionRequest, latency: Duration) -> Completion {
    Completion {
        text: format!("reply from {}", request.meta.agent_id),
        stop_reason: Some("end_turn".into()),
        usage: Usage {
            input_tokens: 10,
            output_tokens: 5,
            ..Usage::default()
        },
        latency,
        ..Completion::default()
    }
}

pub fn server_error() -> ProviderError {
    ProviderError::new(ErrorKind::Server, "upstream exploded").with_status(500)
}

/// One task per agent id, all on `provider`.
pub fn tasks(ids: &[&str], provider: Arc<dyn Provider>) -> Vec<AgentTask> {
    ids.iter()
        .map(|id| task(id, Arc::clone(&provider)))
        .collect()
}

/// One agent's task on `provider`, with the default policy.
pub fn task(id: &str, provider: Arc<dyn Provider>) -> AgentTask {
    AgentTask::new(
        id,
        "test",
        provider,
        CompletionRequest {
            model: "m".into(),
            system: None,
            prompt: format!("prompt for {id}"),
            max_tokens: 16,
            temperature: None,
            stop_sequences: Vec::new(),
            stream: false,
            prompt_cache: false,
            meta: RequestMeta {
                trace_id: "0".repeat(31) + "1",
                agent_id: id.to_owned(),
                attempt: 0,
            },
            ..CompletionRequest::default()
        },
    )
}

pub const SIX: [&str; 6] = [
    "researcher",
    "analyst",
    "critic",
    "planner",
    "fact-checker",
    "writer",
];

/// The `metaorch` binary with `args`, run in `dir`, without the test's own `METAORCH_*`,
/// `RUST_LOG` and provider variables: what is tested is only what the test sets.
/// `metaorch serve --port 0` started in `dir` with `env`, and the URL it printed on its
/// first line; the rest of its stderr is the caller's to read (or drain), so that it
/// never blocks on a full pipe.
pub fn spawn_serve(
    dir: &Path,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    String,
    std::io::BufReader<std::process::ChildStderr>,
) {
    use std::io::BufRead as _;
    let mut command = metaorch_command(dir, &["serve", "--port", "0"]);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    (child, url, stderr)
}

pub fn metaorch_command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_metaorch"));
    command.args(args).current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let leaks = name.to_str().is_some_and(|n| {
            ["METAORCH_", "ANTHROPIC_", "OPENAI_"]
                .iter()
                .any(|p| n.starts_with(p))
                || n == "RUST_LOG"
                // What the providers' HTTP client reads: a test's calls go where the
                // test says, trusting what it says.
                || n == "SSL_CERT_FILE"
                || n.eq_ignore_ascii_case("HTTPS_PROXY")
                || n.eq_ignore_ascii_case("HTTP_PROXY")
                || n.eq_ignore_ascii_case("ALL_PROXY")
                || n.eq_ignore_ascii_case("NO_PROXY")
        });
        if leaks {
            command.env_remove(name);
        }
    }
    command
}
