//! What calls cost in US dollars: a price per million tokens for each model, built in
//! for current Claude and OpenAI models and overridable in the config (`[prices]`),
//! and the cost of one call's [`Usage`] under it.
//!
//! It sits at the bottom of the crate beside the outcome vocabulary: the executor
//! prices each call it makes, the orchestrator sums a request, and the config names
//! prices, without any of them importing another to do so.
//!
//! **A model without a price has no cost** — `None`, shown as `null` — never an
//! invented number. [`PriceTable::cost`] logs one `price.unknown` warning the first
//! time a model without a price is seen in the process, not once per call.
//!
//! **Which price a model id gets.** First the id exactly as written; then, for a
//! snapshot id, the id without its snapshot tag: a trailing `-YYYYMMDD`
//! (`claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`), `-YYYY-MM-DD`
//! (`gpt-4o-2024-08-06` → `gpt-4o`) or `-latest` (`claude-3-7-sonnet-latest` →
//! `claude-3-7-sonnet`). Nothing looser: `gpt-4o-mini` never takes `gpt-4o`'s price.
//! A config's `[prices."ID"]` replaces the built-in price of that exact id.
//!
//! **Cache tokens.** [`Usage`] counts input in three parts, as Anthropic reports it:
//! `input_tokens` at the input price, `cache_creation_input_tokens` at the cache write
//! price and `cache_read_input_tokens` at the cache read price (the OpenAI provider
//! splits `prompt_tokens` the same way). A price that leaves a cache price out charges
//! those tokens at the input price — except that a `claude-*` model from the config
//! gets Anthropic's documented multipliers, 1.25× input to write (the 5-minute cache
//! that `prompt_cache` asks for) and 0.1× input to read.
//!
//! **What a flat price cannot say.** Some models bill a request by its length
//! (Claude Haiku 5.5 by prompt length; OpenAI's GPT-6 and GPT-5.6 models double above
//! 272K input tokens) or by a processing tier (batch, priority, fast mode). The table
//! holds the standard short-prompt price; Claude Haiku 5.5, whose two bands differ
//! five-fold, has no built-in price at all. Set `[prices."ID"]` for what your account
//! pays.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use serde::Serializer;

use crate::provider::Usage;

/// The highest price per million tokens a config may name, in US dollars: well above
/// any model's (the dearest lists $150 for output), low enough to catch a price
/// typed per token or per thousand in the wrong unit.
pub const MAX_PRICE_PER_MTOK: f64 = 10_000.0;

/// The built-in prices: standard rates, US dollars per million tokens, from
/// Anthropic's pricing page (platform.claude.com/docs/en/about-claude/pricing) and
/// OpenAI's model pages (developers.openai.com/api/docs/models), read November 2026.
/// Claude cache writes are the 5-minute cache's (1.25× input); cache reads are 0.1×
/// input but where Anthropic lists otherwise (Fable 5.1, Opus 5.5, Sonnet 5.5).
const BUILTIN: &[(&str, Price)] = &[
    // Claude.
    ("claude-fable-5-1", Price::cached(10.0, 50.0, 12.5, 0.25)),
    ("claude-mythos-5-1", Price::cached(10.0, 50.0, 12.5, 0.25)),
    ("claude-fable-5", Price::cached(10.0, 50.0, 12.5, 1.0)),
    ("claude-mythos-5", Price::cached(10.0, 50.0, 12.5, 1.0)),
    ("claude-opus-5-5", Price::cached(4.0, 20.0, 5.0, 0.2)),
    ("claude-opus-5", Price::cached(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4-8", Price::cached(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4-7", Price::cached(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4-6", Price::cached(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4-5", Price::cached(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4-1", Price::cached(15.0, 75.0, 18.75, 1.5)),
    ("claude-opus-4-0", Price::cached(15.0, 75.0, 18.75, 1.5)),
    ("claude-opus-4", Price::cached(15.0, 75.0, 18.75, 1.5)),
    ("claude-sonnet-5-5", Price::cached(2.0, 10.0, 2.5, 0.1)),
    ("claude-sonnet-5", Price::cached(2.0, 10.0, 2.5, 0.2)),
    ("claude-sonnet-4-6", Price::cached(3.0, 15.0, 3.75, 0.3)),
    ("claude-sonnet-4-5", Price::cached(3.0, 15.0, 3.75, 0.3)),
    ("claude-sonnet-4-0", Price::cached(3.0, 15.0, 3.75, 0.3)),
    ("claude-sonnet-4", Price::cached(3.0, 15.0, 3.75, 0.3)),
    ("claude-3-7-sonnet", Price::cached(3.0, 15.0, 3.75, 0.3)),
    ("claude-haiku-4-5", Price::cached(1.0, 5.0, 1.25, 0.1)),
    ("claude-3-5-haiku", Price::cached(0.8, 4.0, 1.0, 0.08)),
    ("claude-3-haiku", Price::cached(0.25, 1.25, 0.3, 0.03)),
    // OpenAI: cached input is the cache read price. Models that bill cache writes
    // list them; the others charge nothing extra to write.
    ("gpt-6.2-sol", Price::cached(2.0, 10.0, 2.5, 0.1)),
    ("gpt-6.1-sol", Price::cached(2.0, 10.0, 2.5, 0.1)),
    ("gpt-6-sol", Price::cached(2.0, 10.0, 2.5, 0.2)),
    ("gpt-6-luna", Price::cached(0.1, 0.5, 0.125, 0.01)),
    ("gpt-5.6-luna", Price::cached(0.2, 1.2, 0.25, 0.02)),
    ("gpt-5.4", Price::cached(2.5, 15.0, 2.5, 0.25)),
    ("gpt-5.4-mini", Price::cached(0.75, 4.5, 0.75, 0.075)),
    ("gpt-5.4-nano", Price::cached(0.2, 1.25, 0.2, 0.02)),
    ("gpt-5.1", Price::cached(1.25, 10.0, 1.25, 0.125)),
    ("gpt-5", Price::cached(1.25, 10.0, 1.25, 0.125)),
    ("gpt-5-mini", Price::cached(0.25, 2.0, 0.25, 0.025)),
    ("gpt-5-nano", Price::cached(0.05, 0.4, 0.05, 0.005)),
    ("gpt-4.1", Price::cached(2.0, 8.0, 2.0, 0.5)),
    ("gpt-4.1-mini", Price::cached(0.4, 1.6, 0.4, 0.1)),
    ("gpt-4.1-nano", Price::cached(0.1, 0.4, 0.1, 0.025)),
    ("gpt-4o", Price::cached(2.5, 10.0, 2.5, 1.25)),
    ("gpt-4o-mini", Price::cached(0.15, 0.6, 0.15, 0.075)),
    ("o3", Price::cached(2.0, 8.0, 2.0, 0.5)),
    ("o4-mini", Price::cached(1.1, 4.4, 1.1, 0.275)),
];

/// A model's price in US dollars per million tokens.
///
/// ```
/// use metaorch::cost::Price;
/// use metaorch::provider::Usage;
///
/// let price = Price::new(3.0, 15.0);
/// let usage = Usage { input_tokens: 1_000, output_tokens: 500, ..Usage::default() };
/// assert_eq!(price.cost(&usage), 0.0105);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// A million input tokens, neither written to nor read from a prompt cache.
    pub input_per_mtok: f64,
    /// A million generated tokens.
    pub output_per_mtok: f64,
    /// A million input tokens written to the prompt cache; `None` for the input price.
    pub cache_write_per_mtok: Option<f64>,
    /// A million input tokens read from the prompt cache; `None` for the input price.
    pub cache_read_per_mtok: Option<f64>,
}

impl Price {
    /// A price without cache prices: cache tokens cost what input does.
    pub const fn new(input_per_mtok: f64, output_per_mtok: f64) -> Price {
        Price {
            input_per_mtok,
            output_per_mtok,
            cache_write_per_mtok: None,
            cache_read_per_mtok: None,
        }
    }

    /// A price with its cache write and read prices.
    pub const fn cached(input: f64, output: f64, cache_write: f64, cache_read: f64) -> Price {
        Price {
            input_per_mtok: input,
            output_per_mtok: output,
            cache_write_per_mtok: Some(cache_write),
            cache_read_per_mtok: Some(cache_read),
        }
    }

    /// What `usage` costs at this price, in US dollars.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let write = self.cache_write_per_mtok.unwrap_or(self.input_per_mtok);
        let read = self.cache_read_per_mtok.unwrap_or(self.input_per_mtok);
        (usage.input_tokens as f64 * self.input_per_mtok
            + usage.output_tokens as f64 * self.output_per_mtok
            + usage.cache_creation_input_tokens as f64 * write
            + usage.cache_read_input_tokens as f64 * read)
            / 1_000_000.0
    }

    /// This price with the cache prices it leaves out filled in for `model`: Anthropic's
    /// multipliers (1.25× input to write, 0.1× to read) for a `claude-*` model, and
    /// nothing (the input price) for any other.
    fn for_model(mut self, model: &str) -> Price {
        if model.starts_with("claude-") {
            let input = self.input_per_mtok;
            self.cache_write_per_mtok.get_or_insert(input * 1.25);
            self.cache_read_per_mtok.get_or_insert(input * 0.1);
        }
        self
    }
}

/// Every model's price: the built-in table, with a config's `[prices]` over it.
/// Built once per orchestrator and shared; a lookup takes no allocation.
///
/// ```
/// use metaorch::cost::{Price, PriceTable};
/// use metaorch::provider::Usage;
///
/// let table = PriceTable::with_overrides([("my-model".to_owned(), Price::new(1.0, 2.0))]);
/// let usage = Usage { input_tokens: 1_000_000, output_tokens: 1_000_000, ..Usage::default() };
/// assert_eq!(table.cost("my-model", &usage), Some(3.0));
/// // A snapshot id takes its model's price.
/// assert_eq!(table.price("claude-sonnet-4-5-20250929"), table.price("claude-sonnet-4-5"));
/// assert!(table.price("claude-sonnet-4-5").is_some());
/// ```
#[derive(Debug, Clone)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

impl Default for PriceTable {
    /// The built-in prices alone.
    fn default() -> Self {
        PriceTable::with_overrides(std::iter::empty())
    }
}

impl PriceTable {
    /// The built-in prices with `overrides` (model id → price) replacing or adding to
    /// them.
    pub fn with_overrides(overrides: impl IntoIterator<Item = (String, Price)>) -> PriceTable {
        let mut prices: HashMap<String, Price> = BUILTIN
            .iter()
            .map(|(model, price)| ((*model).to_owned(), *price))
            .collect();
        for (model, price) in overrides {
            let price = price.for_model(&model);
            prices.insert(model, price);
        }
        PriceTable { prices }
    }

    /// The built-in prices, by model id, in the table's order.
    pub fn builtin() -> &'static [(&'static str, Price)] {
        BUILTIN
    }

    /// The price of `model`: its exact id first, then the id without a snapshot tag
    /// (see the [module docs](self)).
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get(without_snapshot(model)?))
    }

    /// What `usage` cost on `model`, in US dollars; `None` when the model has no price,
    /// which is logged once per model per process (`price.unknown`).
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        match self.price(model) {
            Some(price) => Some(price.cost(usage)),
            None => {
                warn_unpriced(model);
                None
            }
        }
    }
}

/// `model` without a trailing snapshot tag (`-YYYYMMDD`, `-YYYY-MM-DD`, `-latest`), or
/// `None` when it has none.
fn without_snapshot(model: &str) -> Option<&str> {
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base).filter(|b| !b.is_empty());
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (base, tag) = model.rsplit_once('-')?;
    if tag.len() == 8 && digits(tag) {
        return Some(base).filter(|b| !b.is_empty());
    }
    // `-YYYY-MM-DD`: the last three dash-separated parts.
    let (rest, month) = base.rsplit_once('-')?;
    let (base, year) = rest.rsplit_once('-')?;
    let dated = year.len() == 4 && month.len() == 2 && tag.len() == 2;
    (dated && digits(year) && digits(month) && digits(tag) && !base.is_empty()).then_some(base)
}

/// One `price.unknown` warning per model per process: a model's cost is unknown on
/// every call, and saying so on every call would drown the log.
fn warn_unpriced(model: &str) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let first = {
        let mut warned = WARNED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Looked up by reference first: no allocation on the calls after the first.
        !warned.contains(model) && warned.insert(model.to_owned())
    };
    if first {
        tracing::warn!(
            event = "price.unknown",
            model,
            "model {model} has no known price: its calls' cost_usd is null; set [prices.\"{model}\"] input_per_mtok and output_per_mtok in the config"
        );
    }
}

/// Adds costs, any of them unknown: the sum is unknown (`None`) if one part is.
///
/// ```
/// use metaorch::cost::sum;
/// assert_eq!(sum([Some(0.5), Some(0.25)]), Some(0.75));
/// assert_eq!(sum([Some(0.5), None]), None);
/// assert_eq!(sum([]), Some(0.0));
/// ```
pub fn sum(costs: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    costs.into_iter().try_fold(0.0, |total, c| Some(total + c?))
}

/// Serializes a cost in US dollars rounded to 1e-10 (a hundredth of a cent per
/// million tokens): `0.0021`, not `0.0021000000000000003`. `None` is `null`.
pub(crate) fn as_usd<S: Serializer>(cost: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match cost {
        Some(c) => s.serialize_some(&round_usd(*c)),
        None => s.serialize_none(),
    }
}

/// `usd` to ten decimal places.
pub(crate) fn round_usd(usd: f64) -> f64 {
    (usd * 1e10).round() / 1e10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, write: u64, read: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: write,
            cache_read_input_tokens: read,
        }
    }

    #[test]
    fn every_token_kind_has_its_own_price() {
        let table = PriceTable::default();
        // Sonnet 4.5: $3 in, $15 out, $3.75 to write the cache, $0.30 to read it.
        let cost = table
            .cost("claude-sonnet-4-5", &usage(1_000, 2_000, 4_000, 10_000))
            .unwrap();
        let expected = (1_000.0 * 3.0 + 2_000.0 * 15.0 + 4_000.0 * 3.75 + 10_000.0 * 0.3) / 1e6;
        assert_eq!(cost, expected);
        assert_eq!(round_usd(cost), 0.051);
    }

    #[test]
    fn snapshot_ids_resolve_to_their_model_and_nothing_looser_does() {
        let table = PriceTable::default();
        for (id, base) in [
            ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
            ("claude-opus-4-20250514", "claude-opus-4"),
            ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ] {
            assert_eq!(without_snapshot(id), Some(base), "{id}");
            assert_eq!(table.price(id), table.price(base), "{id}");
            assert!(table.price(id).is_some(), "{id}");
        }
        for id in [
            "gpt-4o-mini-x",
            "claude-sonnet-4-5-2025",
            "claude-sonnet-4-5-202509290",
            "-20250929",
            "-latest",
            "sim-1",
            "gpt-4o-2024-8-06",
        ] {
            assert_eq!(without_snapshot(id), None, "{id}");
        }
        assert!(
            table
                .price("gpt-4o-mini-2024-07-18")
                .unwrap()
                .input_per_mtok
                == 0.15
        );
        assert!(table.price("sim-1").is_none());
    }

    #[test]
    fn an_override_beats_the_built_in_price_and_fills_claude_cache_prices() {
        let table = PriceTable::with_overrides([
            ("claude-sonnet-4-5".to_owned(), Price::new(1.0, 2.0)),
            ("local-llama".to_owned(), Price::new(0.5, 0.5)),
        ]);
        let claude = table.price("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(claude.input_per_mtok, 1.0);
        assert_eq!(claude.cache_write_per_mtok, Some(1.25));
        assert_eq!(claude.cache_read_per_mtok, Some(0.1));
        // Not a Claude model: cache tokens at the input price.
        let local = table.price("local-llama").unwrap();
        assert_eq!(local.cache_read_per_mtok, None);
        assert_eq!(
            table.cost("local-llama", &usage(0, 0, 1_000_000, 1_000_000)),
            Some(1.0)
        );
    }

    #[test]
    fn sums_are_unknown_when_a_part_is() {
        assert_eq!(sum([Some(1.0), Some(2.0)]), Some(3.0));
        assert_eq!(sum([None, Some(2.0)]), None);
        assert_eq!(sum(std::iter::empty()), Some(0.0));
    }

    #[test]
    fn built_in_prices_are_sane() {
        let mut seen = HashSet::new();
        for (model, p) in BUILTIN {
            assert!(seen.insert(*model), "{model} listed twice");
            assert_eq!(without_snapshot(model), None, "{model} is a base id");
            for v in [
                p.input_per_mtok,
                p.output_per_mtok,
                p.cache_write_per_mtok.unwrap(),
                p.cache_read_per_mtok.unwrap(),
            ] {
                assert!((0.0..=MAX_PRICE_PER_MTOK).contains(&v), "{model}");
            }
            assert!(
                p.cache_read_per_mtok.unwrap() <= p.input_per_mtok,
                "{model}"
            );
        }
    }
}
