//! The faults the mock injects, and how one is chosen for a request.

use std::fmt;
use std::str::FromStr;

/// A failure the mock can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockFault {
    /// 429 with `retry-after` and `retry-after-ms`.
    RateLimited,
    /// 429 without any retry hint.
    RateLimitedBare,
    /// 529 `overloaded_error` (503 on the OpenAI endpoint).
    Overloaded,
    /// 500 `api_error`.
    Server,
    /// 504 `timeout_error`.
    GatewayTimeout,
    /// A streaming request gets 200 and a few events, then an error event.
    StreamError,
    /// A streaming request gets 200 and a few events, then the stream ends early.
    StreamCut,
    /// 200 headers, then the connection is dropped before any body.
    Reset,
    /// Half the body, then the connection is closed (a `Content-Length` promising the
    /// whole); a stream is closed in the middle of an event.
    Cut,
    /// 200 with an error object for a body (`overloaded_error` on Anthropic's
    /// endpoint, `server_error` on OpenAI's), streaming requests included.
    Error200,
    /// No answer for ten minutes (past any sane client timeout).
    Hang,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with a 9 MiB body.
    Oversized,
}

const NAMES: [(MockFault, &str); 13] = [
    (MockFault::RateLimited, "rate_limited"),
    (MockFault::RateLimitedBare, "rate_limited_bare"),
    (MockFault::Overloaded, "overloaded"),
    (MockFault::Server, "server"),
    (MockFault::GatewayTimeout, "gateway_timeout"),
    (MockFault::StreamError, "stream_error"),
    (MockFault::StreamCut, "stream_cut"),
    (MockFault::Reset, "reset"),
    (MockFault::Cut, "cut"),
    (MockFault::Error200, "error200"),
    (MockFault::Hang, "hang"),
    (MockFault::Malformed, "malformed"),
    (MockFault::Oversized, "oversized"),
];

impl MockFault {
    /// The name used on the command line and in the request log.
    pub fn as_str(self) -> &'static str {
        NAMES
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("unknown", |(_, n)| n)
    }
}

impl fmt::Display for MockFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MockFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NAMES
            .iter()
            .find(|(_, n)| *n == s.trim())
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
                format!(
                    "\"{s}\" is not a fault; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Fail the first `first` requests whose body contains `matches` (counted per exact
/// body, so each retry of the same call counts) with `fault`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockScript {
    /// Text the request body must contain (an agent's system prompt, say).
    pub matches: String,
    /// How many times the same body fails before it succeeds.
    pub first: u32,
    /// How it fails.
    pub fault: MockFault,
}

impl FromStr for MockScript {
    type Err = String;

    /// `TEXT:N:FAULT`, e.g. `researcher:2:overloaded` (TEXT may itself contain `:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.rsplitn(3, ':');
        let (Some(fault), Some(first), Some(matches)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "\"{s}\" is not a script; expected TEXT:N:FAULT, e.g. researcher:2:overloaded"
            ));
        };
        let first = first
            .parse()
            .map_err(|_| format!("in \"{s}\": \"{first}\" is not a count; expected e.g. 2"))?;
        if matches.is_empty() {
            return Err(format!("in \"{s}\": the text to match is empty"));
        }
        Ok(MockScript {
            matches: matches.to_owned(),
            first,
            fault: fault.parse()?,
        })
    }
}

/// The fault for a request: the first script that matches, else a draw against the
/// rates (`roll` uniform in [0, 1)).
pub(crate) fn pick(
    script: &[MockScript],
    rates: &[(MockFault, f64)],
    body: &[u8],
    seen: u32,
    roll: f64,
) -> Option<MockFault> {
    if let Some(s) = script
        .iter()
        .find(|s| seen <= s.first && memchr::memmem::find(body, s.matches.as_bytes()).is_some())
    {
        return Some(s.fault);
    }
    let mut edge = 0.0;
    for (fault, rate) in rates {
        edge += rate;
        if roll < edge {
            return Some(*fault);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (fault, name) in NAMES {
            assert_eq!(name.parse::<MockFault>().unwrap(), fault);
            assert_eq!(fault.to_string(), name);
        }
        assert!(
            "gremlins"
                .parse::<MockFault>()
                .unwrap_err()
                .contains("expected one of")
        );
    }

    #[test]
    fn scripts_parse_and_match_the_first_n() {
        let s: MockScript = "You are a critic: sharp:2:overloaded".parse().unwrap();
        assert_eq!(s.matches, "You are a critic: sharp");
        assert_eq!((s.first, s.fault), (2, MockFault::Overloaded));
        assert!("x:y:server".parse::<MockScript>().is_err());
        assert!("server".parse::<MockScript>().is_err());
        let script = [s];
        let body = b"... You are a critic: sharp ...";
        assert_eq!(
            pick(&script, &[], body, 2, 0.9),
            Some(MockFault::Overloaded)
        );
        assert_eq!(pick(&script, &[], body, 3, 0.9), None);
        assert_eq!(
            pick(&script, &[(MockFault::Server, 0.5)], b"other", 1, 0.4),
            Some(MockFault::Server)
        );
    }
}
