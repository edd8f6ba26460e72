//! The cache key: SHA-256 of everything that changes a call's answer, and nothing
//! secret.

use std::fmt;

use crate::provider::CompletionRequest;

/// A call's identity in the cache: 32 bytes of SHA-256 over the provider's identity
/// (its kind and where it is, never its key), the model, the system prompt, the earlier
/// turns, the prompt, `max_tokens`, `temperature` and the stop sequences. Whether the
/// call streams, its trace and its attempt do not change the answer and are left out.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `request` sent to the provider identified by `provider`.
    pub fn of(provider: &str, request: &CompletionRequest) -> CacheKey {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        // Every field length-prefixed, so no two different calls hash the same bytes.
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b"metaorch-cache-v1");
        field(provider.as_bytes());
        field(request.model.as_bytes());
        match &request.system {
            Some(system) => field(system.as_bytes()),
            None => field(b"\xff no system"),
        }
        field(&(request.history.len() as u64).to_le_bytes());
        for turn in request.history.iter() {
            field(turn.role.as_str().as_bytes());
            field(turn.content.as_bytes());
        }
        field(request.prompt.as_bytes());
        field(&request.max_tokens.to_le_bytes());
        match request.temperature {
            Some(t) => field(&t.to_bits().to_le_bytes()),
            None => field(b"\xff no temperature"),
        }
        field(&(request.stop_sequences.len() as u64).to_le_bytes());
        for stop in &request.stop_sequences {
            field(stop.as_bytes());
        }
        let digest = h.finish();
        let mut key = [0; 32];
        key.copy_from_slice(digest.as_ref());
        CacheKey(key)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// 64 lowercase hex digits.
impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{RequestMeta, Speaker, Turn};

    fn request() -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            system: Some("s".into()),
            prompt: "p".into(),
            max_tokens: 100,
            temperature: Some(0.5),
            ..CompletionRequest::default()
        }
    }

    #[test]
    fn what_changes_the_answer_changes_the_key() {
        let base = CacheKey::of("anthropic https://a", &request());
        assert_eq!(base, CacheKey::of("anthropic https://a", &request()));
        let variants: Vec<CompletionRequest> = vec![
            CompletionRequest {
                model: "m2".into(),
                ..request()
            },
            CompletionRequest {
                system: None,
                ..request()
            },
            CompletionRequest {
                prompt: "p2".into(),
                ..request()
            },
            CompletionRequest {
                max_tokens: 101,
                ..request()
            },
            CompletionRequest {
                temperature: Some(0.6),
                ..request()
            },
            CompletionRequest {
                temperature: None,
                ..request()
            },
            CompletionRequest {
                stop_sequences: vec!["x".into()],
                ..request()
            },
            CompletionRequest {
                history: vec![Turn {
                    role: Speaker::User,
                    content: "hi".into(),
                }]
                .into(),
                ..request()
            },
        ];
        for v in variants {
            assert_ne!(base, CacheKey::of("anthropic https://a", &v), "{v:?}");
        }
        assert_ne!(base, CacheKey::of("anthropic https://b", &request()));
        // Fields cannot bleed into each other.
        let a = CompletionRequest {
            system: Some("ab".into()),
            prompt: "c".into(),
            ..request()
        };
        let b = CompletionRequest {
            system: Some("a".into()),
            prompt: "bc".into(),
            ..request()
        };
        assert_ne!(CacheKey::of("x", &a), CacheKey::of("x", &b));
    }

    #[test]
    fn who_asks_and_how_do_not_change_the_key() {
        let base = CacheKey::of("x", &request());
        let other = CompletionRequest {
            stream: true,
            meta: RequestMeta {
                trace_id: "t".into(),
                agent_id: "someone".into(),
                attempt: 3,
            },
            ..request()
        };
        assert_eq!(base, CacheKey::of("x", &other));
        assert_eq!(base.to_string().len(), 64);
    }
}
