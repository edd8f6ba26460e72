//! metaorch as a library: three agents on the built-in simulator, one request, the
//! answer and each agent's outcome. Runs offline:
//!
//! ```sh
//! cargo run --example library
//! ```
//!
//! Point an agent at Claude by adding a `[providers.claude]` table with
//! `kind = "anthropic"` and `provider = "claude"` on the agent, with the key in
//! `ANTHROPIC_API_KEY`; the code does not change.

use metaorch::{Config, Orchestrator, Request};

const CONFIG: &str = r#"
request_timeout = "10s"

[providers.sim]
kind = "sim"
latency_min = "100ms"
latency_max = "400ms"
seed = 7

[[agents]]
id = "researcher"
role = "Researcher"
system = "Gather the facts that bear on the question."
prompt = "Research: {query}"
provider = "sim"

[[agents]]
id = "critic"
role = "Critic"
system = "Find the weakest assumptions."
prompt = "Criticise: {query}"
provider = "sim"

[[agents]]
id = "writer"
role = "Writer"
system = "Answer clearly and briefly."
prompt = "Answer: {query}"
provider = "sim"
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Or `Config::embedded()` for the six default agents, or `Config::from_file(path)`.
    let config = Config::from_toml_str(CONFIG, "example")?;
    // One orchestrator serves every request of the process: build it once, clone it
    // into each task; its limits, breakers and flow control are shared.
    let orchestrator = Orchestrator::builder().config(config).build()?;

    let request = Request::new("Should we rewrite the billing service in Rust?")
        .with_timeout(std::time::Duration::from_secs(5));
    let response = orchestrator.process_request(request).await?;

    for outcome in &response.outcomes {
        println!(
            "{:<10} {:<9} {:>7.3} s  {} attempt(s)",
            outcome.agent_id,
            outcome.status,
            outcome.latency.as_secs_f64(),
            outcome.attempts
        );
    }
    println!(
        "\n{} of {} agents succeeded (trace {})\n",
        response.summary.succeeded,
        response.outcomes.len(),
        response.trace_id
    );
    println!("{}", response.answer);
    Ok(())
}
