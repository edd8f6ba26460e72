//! `[prices."MODEL"]`: US dollars per million tokens, each finite, not negative and at
//! most [`MAX_PRICE_PER_MTOK`], the two base prices required.

use std::collections::BTreeMap;

use toml::Spanned;

use super::super::raw::RawPrice;
use super::Validator;
use crate::cost::{MAX_PRICE_PER_MTOK, Price};

impl Validator<'_> {
    pub(super) fn prices(
        &mut self,
        raw: BTreeMap<String, Spanned<RawPrice>>,
    ) -> BTreeMap<String, Price> {
        let mut prices = BTreeMap::new();
        for (model, table) in raw {
            let span = table.span();
            let raw = table.into_inner();
            let field = |name: &str| format!("prices.\"{model}\".{name}");
            if model.trim().is_empty() {
                self.error(
                    Some(span.clone()),
                    "prices.\"\"",
                    "the model id is empty; name the model as agents ask for it, e.g. [prices.\"claude-sonnet-4-5\"]".into(),
                );
                continue;
            }
            let base = |v: &mut Self, value: Option<Spanned<f64>>, name: &str, what: &str| {
                match value {
                    Some(value) => v.price(value, &field(name)),
                    None => {
                        v.error(
                            Some(span.clone()),
                            field(name),
                            format!(
                                "is missing; expected the price of a million {what} tokens in US dollars, e.g. {name} = 3.0"
                            ),
                        );
                        None
                    }
                }
            };
            let input = base(self, raw.input_per_mtok, "input_per_mtok", "input");
            let output = base(self, raw.output_per_mtok, "output_per_mtok", "output");
            let cache_write = raw
                .cache_write_per_mtok
                .map(|v| self.price(v, &field("cache_write_per_mtok")));
            let cache_read = raw
                .cache_read_per_mtok
                .map(|v| self.price(v, &field("cache_read_per_mtok")));
            if let (Some(input), Some(output), Some(Some(_)) | None, Some(Some(_)) | None) =
                (input, output, cache_write, cache_read)
            {
                prices.insert(
                    model,
                    Price {
                        input_per_mtok: input,
                        output_per_mtok: output,
                        cache_write_per_mtok: cache_write.flatten(),
                        cache_read_per_mtok: cache_read.flatten(),
                    },
                );
            }
        }
        prices
    }

    /// One price: finite, from 0 to the maximum.
    fn price(&mut self, value: Spanned<f64>, field: &str) -> Option<f64> {
        let span = value.span();
        let v = value.into_inner();
        if v.is_finite() && (0.0..=MAX_PRICE_PER_MTOK).contains(&v) {
            return Some(v);
        }
        let what = if v.is_finite() {
            format!("{v} is out of range")
        } else {
            format!("{v} is not a price")
        };
        self.error(
            Some(span),
            field,
            format!(
                "{what}; expected US dollars per million tokens, from 0 to {MAX_PRICE_PER_MTOK}, e.g. 3.0"
            ),
        );
        None
    }
}
