//! What calls cost: the price table, each outcome's `cost_usd` and the request's
//! `usage.cost_usd`, the JSON they make, Anthropic's prompt cache on the wire and in
//! the bill, and the config's `[prices]`. HTTP goes to `mock-upstream` or a tiny server
//! of the test's own, on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Behaviour, Capture, Scripted, server_error, task};
use metaorch::config::Config;
use metaorch::cost::{Price, PriceTable};
use metaorch::executor::{Executor, Fallback};
use metaorch::limits::ConcurrencyLimit;
use metaorch::mock_upstream::{MockOptions, MockUpstream};
use metaorch::orchestrator::Orchestrator;
use metaorch::provider::Usage;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn usage(input: u64, output: u64, write: u64, read: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: write,
        cache_read_input_tokens: read,
    }
}

/// `usage` at `price`, in US dollars, computed the long way.
fn at(price: (f64, f64, f64, f64), u: &Usage) -> f64 {
    (u.input_tokens as f64 * price.0
        + u.output_tokens as f64 * price.1
        + u.cache_creation_input_tokens as f64 * price.2
        + u.cache_read_input_tokens as f64 * price.3)
        / 1e6
}

#[test]
fn a_known_model_costs_each_kind_of_token_at_its_price() {
    let table = PriceTable::default();
    let u = usage(12_000, 3_000, 50_000, 200_000);
    // Claude Sonnet 4.5: $3 in, $15 out, $3.75 to write the cache, $0.30 to read it.
    let sonnet = (3.0, 15.0, 3.75, 0.3);
    assert_eq!(table.cost("claude-sonnet-4-5", &u), Some(at(sonnet, &u)));
    // A snapshot id is priced as its model.
    assert_eq!(
        table.cost("claude-sonnet-4-5-20250929", &u),
        Some(at(sonnet, &u))
    );
    // GPT-4.1: $2 in, $8 out, cached input $0.50; it bills no cache writes.
    let gpt = (2.0, 8.0, 2.0, 0.5);
    assert_eq!(table.cost("gpt-4.1-2025-04-14", &u), Some(at(gpt, &u)));
}

#[test]
fn an_override_beats_the_built_in_price() {
    let table = PriceTable::with_overrides([(
        "claude-sonnet-4-5".to_owned(),
        Price::cached(1.0, 2.0, 3.0, 4.0),
    )]);
    let u = usage(1_000_000, 1_000_000, 1_000_000, 1_000_000);
    assert_eq!(table.cost("claude-sonnet-4-5", &u), Some(10.0));
    assert_eq!(table.cost("claude-sonnet-4-5-20250929", &u), Some(10.0));
    // Other models keep theirs.
    assert_eq!(
        table.cost("claude-haiku-4-5", &usage(1_000_000, 0, 0, 0)),
        Some(1.0)
    );
}

#[test]
fn an_unknown_model_has_no_cost_and_one_warning_however_many_calls() {
    let capture = Capture::global();
    let table = PriceTable::default();
    for _ in 0..100 {
        assert_eq!(table.cost("unpriced-model-one", &usage(10, 10, 0, 0)), None);
        assert_eq!(table.cost("unpriced-model-two", &Usage::default()), None);
    }
    // Another table in the same process does not warn again.
    assert_eq!(
        PriceTable::default().cost("unpriced-model-one", &Usage::default()),
        None
    );
    let warnings = |model: &str| {
        capture
            .lines()
            .iter()
            .filter(|l| l["event"] == "price.unknown" && l["model"] == model)
            .count()
    };
    assert_eq!(warnings("unpriced-model-one"), 1);
    assert_eq!(warnings("unpriced-model-two"), 1);
    let line = capture
        .lines()
        .into_iter()
        .find(|l| l["model"] == "unpriced-model-one")
        .unwrap();
    assert_eq!(line["level"], "WARN");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("[prices.\"unpriced-model-one\"]"),
        "{line}"
    );
}

/// Outcomes priced by the model each call used: a fallback's call at the fallback's
/// price, a failure with no reply at 0, an unpriced model at `None`.
#[tokio::test]
async fn outcomes_are_priced_by_the_model_that_answered() {
    let prices = Arc::new(PriceTable::with_overrides([
        ("primary-model".to_owned(), Price::new(1.0, 2.0)),
        ("backup-model".to_owned(), Price::new(10.0, 20.0)),
    ]));
    let provider = Arc::new(Scripted::new(&[
        ("broken", Behaviour::Fail(Duration::ZERO, server_error())),
        (
            "broken-unpriced",
            Behaviour::Fail(Duration::ZERO, server_error()),
        ),
    ]));
    let with_model = |id: &str, model: &str| {
        let mut t = task(id, provider.clone());
        t.request.model = model.into();
        t.policy = Arc::new(metaorch::resilience::CallPolicy {
            retry: metaorch::resilience::RetryPolicy {
                max_attempts: 1,
                ..Default::default()
            },
            ..Default::default()
        });
        t
    };
    let tasks = vec![
        with_model("ok", "primary-model"),
        with_model("broken", "primary-model"),
        with_model("broken-unpriced", "unpriced-model-three"),
        with_model("unpriced", "unpriced-model-three"),
        // Fails, then its fallback agent answers on another model.
        with_model("broken", "primary-model").with_fallback(Fallback::Agent(Box::new(with_model(
            "backup",
            "backup-model",
        )))),
        with_model("broken", "primary-model").with_fallback(Fallback::Text("n/a".into())),
    ];
    let executor = Executor::new(Arc::new(ConcurrencyLimit::new(8))).with_prices(prices);
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcomes = executor
        .run(tasks, deadline, &CancellationToken::new())
        .await;
    // The scripted reply uses 10 input and 5 output tokens.
    let reply = usage(10, 5, 0, 0);
    let costs: Vec<Option<f64>> = outcomes.iter().map(|o| o.cost_usd).collect();
    assert_eq!(
        costs,
        [
            Some(at((1.0, 2.0, 1.0, 1.0), &reply)),
            Some(0.0),
            None,
            None,
            Some(at((10.0, 20.0, 10.0, 10.0), &reply)),
            Some(0.0),
        ]
    );
    assert!(outcomes[4].succeeded() && outcomes[4].fallback.is_some());
}

async fn mock() -> MockUpstream {
    MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions {
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(3),
            seed: 5,
            ..MockOptions::default()
        },
    )
    .await
    .expect("the mock binds an ephemeral port")
}

/// An orchestrator on `config`, its Anthropic provider pointed at `url`.
fn orchestrator(config: &str, url: &str) -> Orchestrator {
    let config = Config::from_toml_str(config, "cost.toml").unwrap();
    let url = url.to_owned();
    Orchestrator::builder()
        .config(config)
        .env(move |name| match name {
            "ANTHROPIC_API_KEY" => Some("test-key".into()),
            "ANTHROPIC_BASE_URL" => Some(url.clone()),
            _ => None,
        })
        .build()
        .unwrap()
}

const SYSTEM: &str = "You are one of several agents that share this long system prompt.";

fn claude_agents(prompt_cache: &str, stream: bool) -> String {
    format!(
        r#"
[defaults.retry]
max_attempts = 1
[providers.claude]
kind = "anthropic"
{prompt_cache}
[[agents]]
id = "sonnet"
provider = "claude"
model = "claude-sonnet-4-5-20250929"
system = "{SYSTEM}"
stream = {stream}
[[agents]]
id = "haiku"
provider = "claude"
model = "claude-haiku-4-5"
system = "{SYSTEM}"
stream = {stream}
"#
    )
}

#[tokio::test]
async fn a_request_costs_the_sum_of_its_outcomes_and_says_so_in_json() {
    let mock = mock().await;
    let url = format!("http://{}", mock.addr());
    let config = format!(
        "{}\n[[agents]]\nid = \"custom\"\nprovider = \"claude\"\nmodel = \"house-model\"\n[prices.\"house-model\"]\ninput_per_mtok = 0.5\noutput_per_mtok = 1.5\n",
        claude_agents("", false)
    );
    let response = orchestrator(&config, &url).process("q").await.unwrap();
    assert!(response.ok);
    let prices = [
        (3.0, 15.0, 3.75, 0.3),
        (1.0, 5.0, 1.25, 0.1),
        (0.5, 1.5, 0.5, 0.5),
    ];
    let mut total = 0.0;
    for (o, price) in response.outcomes.iter().zip(prices) {
        assert!(o.usage.input_tokens > 0 && o.usage.output_tokens > 0);
        let expected = at(price, &o.usage);
        assert_eq!(o.cost_usd, Some(expected), "{}", o.agent_id);
        total += expected;
    }
    assert!((response.usage.cost_usd.unwrap() - total).abs() < 1e-15);

    // The token fields as they always were, then the cost; no cache fields when none.
    let text = serde_json::to_string(&response.usage).unwrap();
    let keys: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
    assert_eq!(
        keys,
        ["input_tokens", "output_tokens", "cost_usd"],
        "{text}"
    );
    let json = serde_json::to_value(&response).unwrap();
    let usage = &json["usage"];
    assert_eq!(
        usage["input_tokens"].as_u64(),
        Some(response.usage.input_tokens)
    );
    assert!(usage["cost_usd"].as_f64().unwrap() > 0.0);
    for o in json["outcomes"].as_array().unwrap() {
        assert!(o["cost_usd"].as_f64().unwrap() > 0.0, "{o}");
        // The outcome's token counts keep their shape.
        assert_eq!(o["usage"].as_object().unwrap().len(), 2, "{o}");
    }
    // Rounded to 1e-10: no float noise in the output.
    let text = serde_json::to_string(&json["usage"]["cost_usd"]).unwrap();
    assert!(text.len() <= 14, "{text}");
}

#[tokio::test]
async fn one_unpriced_model_makes_the_total_null() {
    let mock = mock().await;
    let url = format!("http://{}", mock.addr());
    let config = format!(
        "{}\n[[agents]]\nid = \"custom\"\nprovider = \"claude\"\nmodel = \"unpriced-model-four\"\n",
        claude_agents("", false)
    );
    let response = orchestrator(&config, &url).process("q").await.unwrap();
    assert!(response.outcomes[0].cost_usd.is_some());
    assert_eq!(response.outcomes[2].cost_usd, None);
    assert_eq!(response.usage.cost_usd, None);
    let json = serde_json::to_value(&response).unwrap();
    assert!(json["usage"]["cost_usd"].is_null());
    assert!(json["outcomes"][2]["cost_usd"].is_null());
    // The tokens are still counted.
    assert!(json["usage"]["input_tokens"].as_u64().unwrap() > 0);
}

/// A server that records each request body and answers with a fixed Message.
async fn recorder() -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let app = axum::Router::new().route(
        "/v1/messages",
        post(move |body: axum::Json<Value>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(body.0);
                axum::Json(serde_json::json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 3, "output_tokens": 1,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

#[tokio::test]
async fn prompt_cache_marks_the_system_prompt_on_the_wire_and_the_agent_wins() {
    let (url, bodies) = recorder().await;
    // On for the provider; the haiku agent turns it off for itself.
    let config = claude_agents("prompt_cache = true", false).replace(
        "model = \"claude-haiku-4-5\"",
        "model = \"claude-haiku-4-5\"\nprompt_cache = false",
    );
    orchestrator(&config, &url).process("q").await.unwrap();
    let bodies = bodies.lock().unwrap().clone();
    let system_of = |model: &str| {
        bodies
            .iter()
            .find(|b| b["model"] == model)
            .map(|b| b["system"].clone())
            .unwrap()
    };
    assert_eq!(
        system_of("claude-sonnet-4-5-20250929"),
        serde_json::json!([{
            "type": "text",
            "text": SYSTEM,
            "cache_control": {"type": "ephemeral"}
        }])
    );
    assert_eq!(system_of("claude-haiku-4-5"), Value::from(SYSTEM));
}

#[tokio::test]
async fn without_prompt_cache_the_system_prompt_stays_a_string() {
    let (url, bodies) = recorder().await;
    orchestrator(&claude_agents("", false), &url)
        .process("q")
        .await
        .unwrap();
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2);
    for body in bodies {
        assert_eq!(body["system"], Value::from(SYSTEM), "{body}");
    }
}

/// Against mock-upstream, which caches what a breakpoint marks: the first call of a
/// model writes the system prompt, the next ones read it, and the bill follows —
/// plain and streaming.
#[tokio::test]
async fn cache_tokens_are_read_and_billed_at_the_cache_prices() {
    for stream in [false, true] {
        let mock = mock().await;
        let url = format!("http://{}", mock.addr());
        let orchestrator = orchestrator(&claude_agents("prompt_cache = true", stream), &url);
        let first = orchestrator.process("q1").await.unwrap();
        let second = orchestrator.process("q2").await.unwrap();
        for (o, price) in first
            .outcomes
            .iter()
            .zip([(3.0, 15.0, 3.75, 0.3), (1.0, 5.0, 1.25, 0.1)])
        {
            assert!(o.usage.cache_creation_input_tokens > 0, "{stream}: {o:?}");
            assert_eq!(o.usage.cache_read_input_tokens, 0);
            assert_eq!(o.cost_usd, Some(at(price, &o.usage)));
        }
        for (o, price) in second
            .outcomes
            .iter()
            .zip([(3.0, 15.0, 3.75, 0.3), (1.0, 5.0, 1.25, 0.1)])
        {
            assert_eq!(o.usage.cache_creation_input_tokens, 0, "{stream}: {o:?}");
            assert_eq!(
                o.usage.cache_read_input_tokens,
                first.outcomes[0].usage.cache_creation_input_tokens
            );
            assert_eq!(o.cost_usd, Some(at(price, &o.usage)));
        }
        assert_eq!(
            second.usage.cache_read_input_tokens,
            2 * first.outcomes[0].usage.cache_creation_input_tokens
        );
        // The mock's log says the same.
        let records = mock.requests();
        assert_eq!(records.len(), 4);
        assert!(
            records[..2]
                .iter()
                .all(|r| r.cache_creation_input_tokens > 0)
        );
        assert!(records[2..].iter().all(|r| r.cache_read_input_tokens > 0));
    }
}

#[test]
fn bad_prices_are_rejected_with_their_field() {
    let cases = [
        (
            "[prices.\"gpt-4.1\"]\ninput_per_mtok = -1.0\noutput_per_mtok = 8.0\n",
            "cost.toml:2:18: prices.\"gpt-4.1\".input_per_mtok: -1 is out of range; expected US dollars per million tokens, from 0 to 10000, e.g. 3.0",
        ),
        (
            "[prices.m]\ninput_per_mtok = nan\noutput_per_mtok = 8.0\n",
            "prices.\"m\".input_per_mtok: NaN is not a price",
        ),
        (
            "[prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = inf\n",
            "prices.\"m\".output_per_mtok: inf is not a price",
        ),
        (
            "[prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 20000\n",
            "prices.\"m\".output_per_mtok: 20000 is out of range",
        ),
        (
            "[prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\ncache_read_per_mtok = -0.1\n",
            "prices.\"m\".cache_read_per_mtok: -0.1 is out of range",
        ),
        (
            "[prices.m]\noutput_per_mtok = 2.0\n",
            "prices.\"m\".input_per_mtok: is missing; expected the price of a million input tokens in US dollars, e.g. input_per_mtok = 3.0",
        ),
        (
            "[prices.\"gpt-4.1\"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\ncache_per_mtok = 0.1\n",
            "cost.toml:4:1: prices.\"gpt-4.1\".cache_per_mtok: unknown field `cache_per_mtok`, expected one of `input_per_mtok`, `output_per_mtok`, `cache_write_per_mtok`, `cache_read_per_mtok`",
        ),
        (
            "[prices.m]\ninput_per_mtok = \"3\"\noutput_per_mtok = 2.0\n",
            "prices.\"m\".input_per_mtok: invalid type: string \"3\", expected f64",
        ),
    ];
    for (text, expected) in cases {
        let errors = Config::from_toml_str(text, "cost.toml")
            .unwrap_err()
            .to_string();
        assert!(errors.contains(expected), "{text}\n→ {errors}");
    }
}

#[test]
fn prices_in_the_config_are_taken_whole_numbers_included() {
    let config = Config::from_toml_str(
        "[prices.\"house-model\"]\ninput_per_mtok = 3\noutput_per_mtok = 15\ncache_read_per_mtok = 0.3\n",
        "cost.toml",
    )
    .unwrap();
    assert_eq!(
        config.prices["house-model"],
        Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
            cache_write_per_mtok: None,
            cache_read_per_mtok: Some(0.3),
        }
    );
    // No agents: the six default ones, with the default config's price for sim-1.
    assert_eq!(config.agents.len(), 6);
    assert!(config.price_table().price("sim-1").is_some());
    assert!(config.check_prices().is_empty());
}

#[test]
fn prompt_cache_is_for_anthropic_providers_only() {
    let text = "[[agents]]\nid = \"a\"\nprovider = \"sim\"\nprompt_cache = true\n";
    let errors = Config::from_toml_str(text, "cost.toml")
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains(
            "cost.toml:4:16: agents[0].prompt_cache: applies to anthropic providers only, and \"sim\" is a sim provider; remove it"
        ),
        "{errors}"
    );
    let text = "[providers.local]\nkind = \"openai\"\nprompt_cache = true\n";
    let errors = Config::from_toml_str(text, "cost.toml")
        .unwrap_err()
        .to_string();
    assert!(errors.contains("unknown field `prompt_cache`"), "{errors}");
}

#[test]
fn config_check_names_agents_whose_model_has_no_price() {
    let config = Config::from_toml_str(
        "[[agents]]\nid = \"a\"\nprovider = \"sim\"\nmodel = \"sim-2\"\n[[agents]]\nid = \"b\"\nprovider = \"sim\"\n[[agents]]\nid = \"c\"\nprovider = \"sim\"\n[[agents]]\nid = \"d\"\nprovider = \"sim\"\nmodel = \"claude-haiku-4-5\"\n",
        "cost.toml",
    )
    .unwrap();
    assert_eq!(
        config.check_prices(),
        [
            "agents[0].model: \"sim-2\" (agent a) has no known price, so its cost_usd will be null; add [prices.\"sim-2\"] with input_per_mtok and output_per_mtok (US dollars per million tokens)",
            "agents[1].model: \"sim-1\" (agents b, c) has no known price, so its cost_usd will be null; add [prices.\"sim-1\"] with input_per_mtok and output_per_mtok (US dollars per million tokens)",
        ]
    );
}

/// The synthesizer's call is priced like an agent's, and counted in the total.
#[tokio::test]
async fn the_synthesis_is_priced_and_in_the_total() {
    let mock = mock().await;
    let url = format!("http://{}", mock.addr());
    let config = format!(
        "{}\n[synthesizer]\nprovider = \"claude\"\nmodel = \"claude-opus-4-5\"\n",
        claude_agents("", false)
    );
    let response = orchestrator(&config, &url).process("q").await.unwrap();
    let report = response.synthesis.report().expect("a synthesizer ran");
    assert!(report.usage.input_tokens > 0);
    // Claude Opus 4.5: $5 in, $25 out.
    assert_eq!(
        report.cost_usd,
        Some(at((5.0, 25.0, 6.25, 0.5), &report.usage))
    );
    let total = metaorch::cost::sum(
        response
            .outcomes
            .iter()
            .map(|o| o.cost_usd)
            .chain([report.cost_usd]),
    )
    .unwrap();
    assert!((response.usage.cost_usd.unwrap() - total).abs() < 1e-15);
    let json = serde_json::to_value(&response).unwrap();
    assert!(json["synthesis"]["cost_usd"].as_f64().unwrap() > 0.0);
}
