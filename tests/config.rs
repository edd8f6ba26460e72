//! Config errors: one test per kind of bad input. Each error names the place
//! (file:line:col), the field, the value and what is expected.

use std::time::Duration;

use metaorch::config::{Config, ProviderConfig};
use metaorch::resilience::{Jitter, Window};

/// The config's errors, one string each.
fn errors(toml: &str) -> Vec<String> {
    Config::from_toml_str(toml, "test.toml")
        .expect_err("the config should be rejected")
        .errors()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn one_error(toml: &str) -> String {
    let errors = errors(toml);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

const AGENT: &str = "[[agents]]\nid = \"a\"\nprovider = \"sim\"\n";

#[test]
fn toml_syntax_error_has_its_position() {
    let e = one_error("concurrency_limit = \n");
    assert!(e.starts_with("test.toml:1:21: "), "{e}");
    assert!(e.contains("invalid string"), "{e}");
    assert!(!e.contains('\n'), "one line per error: {e}");
}

#[test]
fn unknown_top_level_key_is_an_error() {
    let e = one_error("concurency_limit = 4\n");
    assert!(
        e.starts_with("test.toml:1:1: concurency_limit: unknown field `concurency_limit`"),
        "{e}"
    );
    assert!(e.contains("expected one of `concurrency_limit`"), "{e}");
}

#[test]
fn unknown_agent_key_names_the_agent() {
    let e = one_error(&format!("{AGENT}modle = \"x\"\n"));
    assert!(
        e.starts_with("test.toml:4:1: agents[0].modle: unknown field `modle`"),
        "{e}"
    );
}

#[test]
fn unknown_provider_key_names_the_provider() {
    let e = one_error("[providers.fast]\nkind = \"sim\"\nlatency = \"1s\"\n");
    assert!(e.contains("providers.fast: unknown field `latency`"), "{e}");
    assert!(e.contains("`latency_min`, `latency_max`, `seed`"), "{e}");
}

#[test]
fn unknown_provider_kind_lists_the_known_kinds() {
    let e = one_error("[providers.x]\nkind = \"sim2\"\n");
    assert!(
        e.starts_with(
            "test.toml:2:8: providers.x.kind: unknown variant `sim2`, expected one of `sim`, `anthropic`, `openai`"
        ),
        "{e}"
    );
}

#[test]
fn wrong_type_says_what_was_expected() {
    let e = one_error("concurrency_limit = \"four\"\n");
    assert!(
        e.starts_with("test.toml:1:21: concurrency_limit: invalid type: string \"four\""),
        "{e}"
    );
    let e = one_error("concurrency_limit = -1\n");
    assert!(
        e.contains("concurrency_limit: invalid value: integer `-1`"),
        "{e}"
    );
}

#[test]
fn duration_without_unit_suggests_one() {
    let e = one_error("request_timeout = \"30\"\n");
    assert!(
        e.starts_with("test.toml:1:19: request_timeout: \"30\" is not a duration"),
        "{e}"
    );
    assert!(e.contains("such as \"500ms\", \"30s\" or \"2m\""), "{e}");
}

#[test]
fn undefined_provider_lists_the_defined_ones() {
    let e = one_error(
        "[providers.claude]\nkind = \"sim\"\n\n[[agents]]\nid = \"a\"\nprovider = \"sim\"\n\n[[agents]]\nid = \"b\"\nprovider = \"sim\"\n\n[[agents]]\nid = \"c\"\nprovider = \"claud\"\n",
    );
    assert_eq!(
        e,
        "test.toml:14:12: agents[2].provider: \"claud\" is not a defined provider; defined: claude, sim"
    );
}

#[test]
fn duplicate_agent_ids_are_an_error() {
    let e = one_error(&format!("{AGENT}\n{AGENT}"));
    assert_eq!(
        e,
        "test.toml:6:6: agents[1].id: \"a\" is already the id of an earlier agent; ids must be unique"
    );
}

#[test]
fn ids_with_odd_characters_are_an_error() {
    let e = one_error("[[agents]]\nid = \"my agent\"\nprovider = \"sim\"\n");
    assert!(e.contains("agents[0].id: \"my agent\" contains ' '"), "{e}");
}

#[test]
fn prompt_without_placeholder_is_an_error() {
    let e = one_error(&format!("{AGENT}prompt = \"Summarise the text\"\n"));
    assert!(
        e.starts_with("test.toml:4:10: agents[0].prompt: the template never uses the query"),
        "{e}"
    );
    assert!(e.contains("{query}"), "{e}");
}

#[test]
fn missing_required_agent_field_is_an_error() {
    let e = one_error("[[agents]]\nid = \"a\"\n");
    assert!(e.contains("agents[0]: missing field `provider`"), "{e}");
}

#[test]
fn zero_concurrency_is_an_error() {
    let e = one_error("concurrency_limit = 0\n");
    assert_eq!(
        e,
        "test.toml:1:21: concurrency_limit: 0 would let no agent call run; expected 1 or more"
    );
}

#[test]
fn zero_timeout_is_an_error() {
    let e = one_error("request_timeout = \"0s\"\n");
    assert!(
        e.contains("request_timeout: a zero deadline would time out every request"),
        "{e}"
    );
}

#[test]
fn min_successes_beyond_the_agents_is_an_error() {
    let e = one_error(&format!("min_successes = 2\n{AGENT}"));
    assert_eq!(
        e,
        "test.toml:1:17: min_successes: 2 is more than the 1 configured agents; expected 0 to 1"
    );
}

#[test]
fn an_empty_agent_list_is_an_error() {
    let e = one_error("agents = []\n");
    assert!(e.contains("agents: the list is empty"), "{e}");
}

#[test]
fn temperature_out_of_range_is_an_error() {
    let e = one_error(&format!("{AGENT}temperature = 2.5\n"));
    assert!(
        e.contains("agents[0].temperature: 2.5 is out of range; expected 0.0 to 2.0"),
        "{e}"
    );
}

#[test]
fn zero_max_tokens_is_an_error() {
    let e = one_error(&format!("{AGENT}max_tokens = 0\n"));
    assert!(
        e.contains("agents[0].max_tokens: 0 leaves no room for a reply"),
        "{e}"
    );
}

#[test]
fn inverted_sim_latency_is_an_error() {
    let e =
        one_error("[providers.sim]\nkind = \"sim\"\nlatency_min = \"2s\"\nlatency_max = \"1s\"\n");
    assert!(
        e.contains("providers.sim: latency_min (2s) is greater than latency_max (1s)"),
        "{e}"
    );
}

#[test]
fn bad_log_filter_is_an_error() {
    let e = one_error("[log]\nlevel = \"very loud[\"\n");
    assert!(
        e.starts_with("test.toml:2:9: log.level: \"very loud[\" is not a log filter"),
        "{e}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let errors = errors(
        "concurrency_limit = 0\n[[agents]]\nid = \"a\"\nprovider = \"nope\"\ntemperature = 9.0\n",
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn a_config_without_agents_uses_the_six_defaults() {
    let config = Config::from_toml_str("concurrency_limit = 2\n", "test.toml").unwrap();
    assert_eq!(config.agents.len(), 6);
    assert_eq!(config.concurrency_limit, 2);
    assert_eq!(config.request_timeout, Duration::from_secs(60));
}

#[test]
fn the_example_config_is_valid_and_matches_the_defaults() {
    let text = include_str!("../metaorch.example.toml");
    let config = Config::from_toml_str(text, "metaorch.example.toml").unwrap();
    let defaults = Config::embedded();
    assert_eq!(config.concurrency_limit, defaults.concurrency_limit);
    assert_eq!(config.request_timeout, defaults.request_timeout);
    assert_eq!(config.min_successes, defaults.min_successes);
    assert_eq!(config.log_filter(), defaults.log_filter());
    assert_eq!(config.log_file, defaults.log_file);
    assert_eq!(config.providers, defaults.providers);
    assert_eq!(config.flow, defaults.flow);
    assert_eq!(config.breaker, defaults.breaker);
    assert_eq!(config.retry_budget, defaults.retry_budget);
    assert_eq!(config.agents[0], defaults.agents[0]);
    assert_eq!(config.prices, defaults.prices);
}

#[test]
fn an_unreadable_file_says_why() {
    let e = Config::from_file(std::path::Path::new("/nonexistent/metaorch.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/nonexistent/metaorch.toml: cannot read the config file"),
        "{e}"
    );
}

#[test]
fn sim_options_are_read() {
    let config = Config::from_toml_str(
        "[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"1.5s\"\nseed = 3\n",
        "test.toml",
    )
    .unwrap();
    let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
        panic!("sim is a sim")
    };
    assert_eq!(sim.latency_min, Duration::from_millis(1));
    assert_eq!(sim.latency_max, Duration::from_millis(1500));
    assert_eq!(sim.seed, Some(3));
}

#[test]
fn resilience_settings_are_read_and_agents_override_defaults() {
    let config = Config::from_toml_str(
        r#"
seed = 11
[defaults]
attempt_timeout = "10s"
[defaults.retry]
max_attempts = 3
initial_delay = "250ms"
multiplier = 3.0
max_delay = "5s"
jitter = "decorrelated"
retry_after_max = "20s"
[defaults.breaker]
window = "time"
window_duration = "30s"
failure_rate_threshold = 0.25
slow_call_threshold = "20s"
slow_call_rate = 0.8
minimum_calls = 5
open_for = "15s"
half_open_probes = 1
[retry_budget]
capacity = 50
retry_cost = 2
[[agents]]
id = "a"
provider = "sim"
attempt_timeout = "none"
retry = { max_attempts = 1 }
[[agents]]
id = "b"
provider = "sim"
"#,
        "test.toml",
    )
    .unwrap();
    let a = &config.agents[0].policy;
    assert_eq!(a.retry.max_attempts, 1);
    assert_eq!(
        a.retry.initial_delay,
        Duration::from_millis(250),
        "the rest from [defaults]"
    );
    assert_eq!(a.attempt_timeout, None);
    let b = &config.agents[1].policy;
    assert_eq!(b.retry.max_attempts, 3);
    assert_eq!(b.retry.multiplier, 3.0);
    assert_eq!(b.retry.jitter, Jitter::Decorrelated);
    assert_eq!(b.retry.retry_after_max, Duration::from_secs(20));
    assert_eq!(b.attempt_timeout, Some(Duration::from_secs(10)));
    assert_eq!(config.breaker.window, Window::Time(Duration::from_secs(30)));
    assert_eq!(config.breaker.failure_rate_threshold, 0.25);
    assert_eq!(config.breaker.half_open_probes, 1);
    assert_eq!(config.retry_budget.capacity, 50);
    assert_eq!(config.retry_budget.retry_cost, 2);
    assert_eq!(
        config.retry_budget.timeout_cost, 10,
        "unset keys keep their default"
    );
    assert_eq!(config.seed, Some(11));
    let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
        panic!("sim is a sim")
    };
    assert_eq!(sim.seed, Some(11), "the top-level seed reaches sim");
}

#[test]
fn unknown_jitter_is_an_error() {
    let e = one_error("[defaults.retry]\njitter = \"fuzzy\"\n");
    assert!(
        e.starts_with("test.toml:2:10: defaults.retry.jitter: unknown variant `fuzzy`"),
        "{e}"
    );
    assert!(e.contains("`none`, `full`, `equal`, `decorrelated`"), "{e}");
}

#[test]
fn zero_attempts_is_an_error() {
    let e = one_error("[defaults.retry]\nmax_attempts = 0\n");
    assert_eq!(
        e,
        "test.toml:2:16: defaults.retry.max_attempts: 0 is out of range; expected 1 (no retries) to 100, the first try included"
    );
}

#[test]
fn shrinking_multiplier_is_an_error() {
    let e = one_error(&format!("{AGENT}retry = {{ multiplier = 0.5 }}\n"));
    assert!(
        e.contains("agents[0].retry.multiplier: 0.5 is out of range; expected 1.0"),
        "{e}"
    );
}

#[test]
fn initial_delay_beyond_max_delay_is_an_error() {
    let e = one_error("[defaults.retry]\ninitial_delay = \"10s\"\nmax_delay = \"1s\"\n");
    assert!(
        e.contains("defaults.retry: initial_delay (10s) is greater than max_delay (1s)"),
        "{e}"
    );
}

#[test]
fn zero_attempt_timeout_is_an_error() {
    let e = one_error("[defaults]\nattempt_timeout = \"0s\"\n");
    assert!(
        e.starts_with("test.toml:2:19: defaults.attempt_timeout: a zero timeout"),
        "{e}"
    );
}

#[test]
fn breaker_rate_out_of_range_is_an_error() {
    let e = one_error("[defaults.breaker]\nfailure_rate_threshold = 50\n");
    assert!(
        e.starts_with("test.toml:2:26: defaults.breaker.failure_rate_threshold: 50 is out of range; expected a fraction"),
        "{e}"
    );
}

#[test]
fn window_size_on_a_time_window_is_an_error() {
    let e = one_error("[defaults.breaker]\nwindow = \"time\"\nwindow_size = 20\n");
    assert!(
        e.contains("defaults.breaker.window_size: applies to a count window"),
        "{e}"
    );
}

#[test]
fn fallback_to_an_unknown_agent_is_an_error() {
    let e = one_error(&format!("{AGENT}fallback = {{ agent = \"ghost\" }}\n"));
    assert!(
        e.contains("agents[0].fallback.agent: \"ghost\" is not an agent's id; defined: a"),
        "{e}"
    );
}

#[test]
fn fallback_to_itself_is_an_error() {
    let e = one_error(&format!("{AGENT}fallback = {{ agent = \"a\" }}\n"));
    assert!(e.contains("an agent cannot be its own fallback"), "{e}");
}

#[test]
fn fallback_loop_is_an_error() {
    let errors = errors(
        "[[agents]]\nid = \"a\"\nprovider = \"sim\"\nfallback = { agent = \"b\" }\n\
         [[agents]]\nid = \"b\"\nprovider = \"sim\"\nfallback = { agent = \"a\" }\n",
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("the fallbacks form a loop (a -> b -> a)")),
        "{errors:#?}"
    );
}

#[test]
fn fallback_with_both_agent_and_text_is_an_error() {
    let e = one_error(&format!(
        "{AGENT}fallback = {{ agent = \"a\", text = \"x\" }}\n"
    ));
    assert!(
        e.contains("agents[0].fallback: expected exactly one of `agent` or `text`"),
        "{e}"
    );
}

#[test]
fn unused_standby_agent_is_an_error() {
    let e = one_error(&format!(
        "{AGENT}[[agents]]\nid = \"b\"\nprovider = \"sim\"\nstandby = true\n"
    ));
    assert!(
        e.contains("agents[1].standby: \"b\" is standby but no agent falls back to it"),
        "{e}"
    );
}

#[test]
fn fault_rate_out_of_range_is_an_error() {
    let e = one_error("[providers.sim]\nkind = \"sim\"\n[providers.sim.faults]\nserver = 1.5\n");
    assert!(
        e.contains("providers.sim.faults.server: 1.5 is out of range"),
        "{e}"
    );
}

#[test]
fn fault_rates_adding_past_one_are_an_error() {
    let e = one_error(
        "[providers.sim]\nkind = \"sim\"\n[providers.sim.faults]\nserver = 0.6\noverloaded = 0.6\n",
    );
    assert!(
        e.contains("providers.sim.faults: the fault rates add up to 1.2"),
        "{e}"
    );
}

#[test]
fn fault_script_for_an_unknown_agent_is_an_error() {
    let e = one_error(
        "[providers.sim]\nkind = \"sim\"\n[[providers.sim.faults.script]]\nagent = \"ghost\"\nfirst_attempts = 1\nkind = \"server\"\n",
    );
    assert!(
        e.contains("providers.sim.faults.script[0].agent: \"ghost\" is not an agent's id"),
        "{e}"
    );
}

#[test]
fn unknown_fault_kind_is_an_error() {
    let e = one_error(
        "[providers.sim]\nkind = \"sim\"\n[[providers.sim.faults.script]]\nagent = \"researcher\"\nfirst_attempts = 1\nkind = \"gremlins\"\n",
    );
    assert!(e.contains("unknown variant `gremlins`"), "{e}");
}

#[test]
fn http_providers_are_read() {
    let config = Config::from_toml_str(
        r#"
[providers.claude]
kind = "anthropic"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:11434"
max_tokens_field = "max_completion_tokens"
api_key_env = "LOCAL_KEY"
[[agents]]
id = "a"
provider = "claude"
model = "claude-sonnet-4-5"
stream = true
stop_sequences = ["END"]
[[agents]]
id = "b"
provider = "local"
model = "llama3.2"
"#,
        "test.toml",
    )
    .unwrap();
    let ProviderConfig::Anthropic(claude) = &config.providers["claude"] else {
        panic!("anthropic")
    };
    assert_eq!(claude.api_key_env, "ANTHROPIC_API_KEY");
    assert_eq!(claude.version, "2023-06-01");
    assert!(claude.key_required && claude.base_url.is_none());
    let ProviderConfig::OpenAi(local) = &config.providers["local"] else {
        panic!("openai")
    };
    assert_eq!(local.base_url.as_deref(), Some("http://127.0.0.1:11434"));
    assert_eq!(local.api_key_env, "LOCAL_KEY");
    assert!(!local.key_required);
    assert!(config.agents[0].stream);
    assert_eq!(config.agents[0].stop_sequences, ["END"]);
}

#[test]
fn a_bad_base_url_is_an_error() {
    let e = one_error("[providers.c]\nkind = \"anthropic\"\nbase_url = \"api.anthropic.com\"\n");
    assert!(
        e.contains("providers.c.base_url: \"api.anthropic.com\" is not an http(s) URL"),
        "{e}"
    );
}

#[test]
fn an_api_key_in_place_of_its_variable_is_an_error() {
    let e = one_error("[providers.c]\nkind = \"anthropic\"\napi_key_env = \"sk-ant-123\"\n");
    assert!(
        e.contains("providers.c.api_key_env: is not an environment variable name"),
        "{e}"
    );
    assert!(
        !e.contains("sk-ant-123"),
        "a key put in the wrong place is not echoed: {e}"
    );
}

#[test]
fn a_non_sim_agent_without_a_model_is_an_error() {
    let e =
        one_error("[providers.c]\nkind = \"openai\"\n[[agents]]\nid = \"a\"\nprovider = \"c\"\n");
    assert!(e.contains("agents[0].model: is missing"), "{e}");
}

#[test]
fn a_bad_otlp_endpoint_is_an_error() {
    let e = one_error("[telemetry]\notlp_endpoint = \"localhost:4318\"\n");
    assert!(
        e.starts_with(
            "test.toml:2:17: telemetry.otlp_endpoint: \"localhost:4318\" is not an http(s) URL"
        ),
        "{e}"
    );
}

#[test]
fn server_settings_are_read_and_tokens_never_printed() {
    let config = Config::from_toml_str(
        "[server]\nbind = \"0.0.0.0\"\nport = 9000\nauth_tokens = [\"tok-123\"]\nmax_in_flight = 8\ndrain_timeout = \"5s\"\n",
        "test.toml",
    )
    .unwrap();
    assert_eq!(config.server.port, 9000);
    assert_eq!(config.server.max_in_flight, 8);
    assert_eq!(config.server.auth_tokens.len(), 1);
    assert!(!format!("{config:?}").contains("tok-123"));
    let e = one_error("[server]\nbind = \"localhost\"\n");
    assert!(
        e.contains("server.bind: \"localhost\" is not an IP address"),
        "{e}"
    );
}

#[test]
fn flow_settings_are_read_and_a_provider_overrides_the_defaults() {
    let config = Config::from_toml_str(
        r#"
        [defaults.flow]
        initial_concurrency = 8
        max_concurrency = 64
        latency_factor = 0
        rpm = 4000

        [providers.claude]
        kind = "anthropic"
        [providers.claude.flow]
        adaptive = false
        input_tpm = 100000
        learn_limits = false
        "#,
        "test.toml",
    )
    .unwrap();
    let flow = &config.flow;
    assert!(flow.concurrency.enabled && flow.learn_limits);
    assert_eq!(
        (
            flow.concurrency.initial,
            flow.concurrency.min,
            flow.concurrency.max
        ),
        (8, 1, 64)
    );
    assert_eq!(flow.concurrency.latency_factor, None);
    assert_eq!(flow.rates.rpm, Some(4000));
    let claude = &config.provider_flow["claude"];
    assert!(!claude.concurrency.enabled && !claude.learn_limits);
    assert_eq!(claude.concurrency.max, 64, "inherited from [defaults.flow]");
    assert_eq!(
        (claude.rates.rpm, claude.rates.input_tpm),
        (Some(4000), Some(100_000))
    );
    assert!(!config.provider_flow.contains_key("sim"));
}

#[test]
fn flow_bounds_out_of_order_are_an_error() {
    let e = one_error("[defaults.flow]\nmin_concurrency = 50\nmax_concurrency = 10\n");
    assert!(
        e.contains("defaults.flow.min_concurrency: 50 is above max_concurrency (10)"),
        "{e}"
    );
    let e = one_error("[defaults.flow]\ninitial_concurrency = 500\nmax_concurrency = 100\n");
    assert!(
        e.contains("defaults.flow.initial_concurrency: 500 is outside min_concurrency..max_concurrency (1..100)"),
        "{e}"
    );
}

#[test]
fn flow_values_out_of_range_are_errors_that_name_the_provider() {
    let errors = errors(
        "[providers.claude]\nkind = \"anthropic\"\n[providers.claude.flow]\nrpm = 0\ndecrease_ratio = 1.5\nlatency_factor = 0.5\nmax_concurrency = 0\n",
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    for field in ["rpm", "decrease_ratio", "latency_factor", "max_concurrency"] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("providers.claude.flow.{field}: "))),
            "{field}: {errors:#?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("leave the key out for no limit"))
    );
}

#[test]
fn an_unknown_flow_key_is_an_error() {
    let e = one_error("[defaults.flow]\nburst = 5\n");
    assert!(e.contains("unknown field `burst`"), "{e}");
}

#[test]
fn sim_account_limits_are_read_and_checked() {
    let config = Config::from_toml_str(
        "[providers.sim]\nkind = \"sim\"\n[providers.sim.limits]\nrps = 2.5\nmax_concurrent = 4\n",
        "test.toml",
    )
    .unwrap();
    let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
        panic!("sim is a sim")
    };
    assert_eq!(
        (sim.limits.rps, sim.limits.max_concurrent),
        (Some(2.5), Some(4))
    );
    let e = one_error("[providers.sim]\nkind = \"sim\"\n[providers.sim.limits]\nrpm = 0\n");
    assert!(
        e.contains("providers.sim.limits.rpm: 0 is out of range"),
        "{e}"
    );
}

#[test]
fn a_breaker_that_could_never_open_is_an_error() {
    let e = one_error("[defaults.breaker]\nwindow_size = 10\nminimum_calls = 20\n");
    assert!(
        e.contains("defaults.breaker.minimum_calls: 20 is more than window_size (10), so the breaker could never open"),
        "{e}"
    );
    let e = one_error("[defaults.breaker]\nwindow_size = 100000000\n");
    assert!(
        e.contains("window_size: 100000000 calls is out of range"),
        "{e}"
    );
}

#[test]
fn an_anthropic_temperature_above_one_is_an_error() {
    let e = one_error(
        "[providers.claude]\nkind = \"anthropic\"\n[[agents]]\nid = \"a\"\nprovider = \"claude\"\nmodel = \"m\"\ntemperature = 1.5\n",
    );
    assert!(
        e.contains("agents[0].temperature: 1.5 is out of range for an anthropic provider; expected 0.0 to 1.0"),
        "{e}"
    );
}

#[test]
fn absurd_durations_are_errors_that_say_the_most_allowed() {
    for toml in [
        "request_timeout = \"300000000000y\"\n",
        "request_timeout = \"1.0e30s\"\n",
        "[defaults.breaker]\nopen_for = \"9999d\"\n",
        "[providers.sim]\nkind = \"sim\"\nlatency_max = \"8d\"\n",
    ] {
        let e = one_error(toml);
        assert!(
            e.contains("is longer than any duration may be (7days)"),
            "{toml}: {e}"
        );
    }
}

#[test]
fn the_synthesizer_is_checked_like_an_agent_and_for_its_own_keys() {
    let synth = |extra: &str| format!("{AGENT}[synthesizer]\nprovider = \"sim\"\n{extra}");
    let ok = Config::from_toml_str(&synth(""), "test.toml").unwrap();
    let s = ok.synthesizer.expect("configured");
    assert_eq!(s.agent.id, "synthesizer");
    assert!(s.agent.stream, "streams unless told otherwise");
    assert_eq!(s.reserve, std::time::Duration::from_secs(10));
    assert!(s.agent.prompt.as_str().contains("{replies}"));

    let e = one_error(&synth("prompt = \"Answer: {query}\"\n"));
    assert!(
        e.contains(
            "synthesizer.prompt: the template never uses the agents' replies; put {replies}"
        ),
        "{e}"
    );
    let e = one_error(&synth("fallback = { text = \"sorry\" }\n"));
    assert!(
        e.contains(
            "synthesizer.fallback: the synthesizer falls back to laying the replies end to end"
        ),
        "{e}"
    );
    let e = one_error(&synth("fallback = { agent = \"nobody\" }\n"));
    assert!(
        e.contains("synthesizer.fallback.agent: \"nobody\" is not an agent's id"),
        "{e}"
    );
    let e = one_error(&format!(
        "request_timeout = \"5s\"\n{}",
        synth("reserve = \"5s\"\n")
    ));
    assert!(
        e.contains("synthesizer.reserve: 5s leaves the agents no time"),
        "{e}"
    );
    let e = one_error(
        &synth("provider = \"nope\"\n").replace("provider = \"sim\"\nprovider", "provider"),
    );
    assert!(
        e.contains("synthesizer.provider: \"nope\" is not a defined provider"),
        "{e}"
    );
    let e = one_error(&synth("temperature = 3.0\n"));
    assert!(
        e.contains("synthesizer.temperature: 3 is out of range"),
        "{e}"
    );
    let e = one_error(&synth("unknown = 1\n"));
    assert!(e.contains("unknown field `unknown`"), "{e}");
    let e = one_error(
        "[[agents]]\nid = \"synthesizer\"\nprovider = \"sim\"\n[synthesizer]\nprovider = \"sim\"\n",
    );
    assert!(e.contains("\"synthesizer\" is the synthesizer's id"), "{e}");
    // A standby agent that only the synthesizer falls back to is not an orphan.
    let standby = format!(
        "{AGENT}[[agents]]\nid = \"b\"\nprovider = \"sim\"\nstandby = true\n[synthesizer]\nprovider = \"sim\"\nfallback = {{ agent = \"b\" }}\n"
    );
    Config::from_toml_str(&standby, "test.toml").unwrap();
}

#[test]
fn the_synthesizer_template_fills_both_placeholders_in_one_pass() {
    let config = Config::from_toml_str(
        &format!("{AGENT}[synthesizer]\nprovider = \"sim\"\nprompt = \"Q: {{query}} R: {{replies}} {{other}}\"\n"),
        "test.toml",
    )
    .unwrap();
    let template = &config.synthesizer.unwrap().agent.prompt;
    assert_eq!(
        template.fill("what about {replies}?", "the replies"),
        "Q: what about {replies}? R: the replies {other}"
    );
}

#[test]
fn http2_is_read_per_provider_with_auto_by_default() {
    let config = Config::from_toml_str(
        r#"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:8081"
http2 = "always"
[providers.claude]
kind = "anthropic"
http2 = "never"
[providers.plain]
kind = "openai"
[[agents]]
id = "a"
provider = "sim"
"#,
        "test.toml",
    )
    .unwrap();
    let http2 = |name: &str| match &config.providers[name] {
        ProviderConfig::OpenAi(http) | ProviderConfig::Anthropic(http) => http.http2,
        ProviderConfig::Sim(_) => unreachable!("{name} is an HTTP provider"),
    };
    use metaorch::provider::Http2;
    assert_eq!(http2("local"), Http2::Always);
    assert_eq!(http2("claude"), Http2::Never);
    assert_eq!(http2("plain"), Http2::Auto);
}

#[test]
fn a_bad_http2_value_names_the_field_and_the_choices() {
    let e = one_error(&format!(
        "[providers.local]\nkind = \"openai\"\nhttp2 = \"yes\"\n\n{AGENT}"
    ));
    assert!(
        e.ends_with(
            "providers.local.http2: \"yes\" is not an HTTP/2 mode; expected \"auto\" (HTTP/2 by ALPN over https, HTTP/1.1 over http), \"always\" (HTTP/2 only: h2c over http) or \"never\" (HTTP/1.1 only)"
        ),
        "{e}"
    );
    assert!(e.starts_with("test.toml:1:"), "{e}");
}

/// `[redis]`: defaults, each bad value named, the URL's credentials never shown, and a
/// Redis cache without a URL of its own using the shared one.
#[test]
fn redis_section_is_checked_and_shared_with_the_cache() {
    let config = Config::from_toml_str(
        "[redis]\nurl = \"redis://:pw-secret@10.0.0.5:6379/2\"\n[cache]\nbackend = \"redis\"\n",
        "t.toml",
    )
    .unwrap();
    let redis = config.redis.as_ref().unwrap();
    assert_eq!(redis.namespace, "metaorch");
    assert_eq!(redis.timeout, Duration::from_millis(100));
    assert_eq!(redis.lease, Duration::from_secs(3));
    assert_eq!(redis.local_share, None);
    let shown = format!("{config:?}");
    assert!(!shown.contains("pw-secret"), "{shown}");
    let cache = config.cache.as_ref().unwrap();
    assert_eq!(cache.backend.name(), "redis");
    assert!(format!("{:?}", cache.backend).contains("10.0.0.5:6379/2"));

    for (toml, expected) in [
        ("[redis]\nnamespace = \"a\"\n", "redis.url: is missing"),
        (
            "[redis]\nurl = \"http://x:1\"\n",
            "redis.url: is not a Redis URL",
        ),
        (
            "[redis]\nurl = \"redis://x\"\nlocal_share = 1.5\n",
            "redis.local_share: 1.5 is out of range",
        ),
        (
            "[redis]\nurl = \"redis://x\"\nlocal_share = 0.0\n",
            "redis.local_share: 0 is out of range",
        ),
        (
            "[redis]\nurl = \"redis://x\"\nlease = \"10ms\"\n",
            "redis.lease: is out of range",
        ),
        (
            "[redis]\nurl = \"redis://x\"\ntimeout = \"30s\"\n",
            "redis.timeout: is out of range",
        ),
        (
            "[redis]\nurl = \"redis://x\"\nnamespace = \"a b\"\n",
            "redis.namespace: expected",
        ),
        ("[redis]\nurl = \"redis://x\"\nport = 1\n", "port"),
    ] {
        let e = Config::from_toml_str(&format!("{toml}{AGENT}"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{toml}: {e}");
    }
}
