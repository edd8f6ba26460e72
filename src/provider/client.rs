//! The HTTP providers' client: one server, one shared HTTP/2 connection (or a pool of
//! HTTP/1.1 connections), TLS with ALPN, proxies from the environment, and nothing a
//! call does not need.
//!
//! Why not reqwest, the crate the rest of the project uses for HTTP: a provider call is
//! the request path's hot spot, held by thousands of calls in flight at once, and
//! reqwest's general-purpose layers (its `Pending` future and retry policy,
//! hyper-util's pooled client future, the copies of each request kept for redirects
//! and retries, a task per HTTP/2 request) were most of what a call in flight cost.
//! Here a call holds an h2 response future (a reference to its stream) and a few bytes
//! of its own. Measured with `bench load --in-flight 1000` over h2c: peak RSS 99 →
//! 56 MB; `bench throughput`: 29 → 16 µs of CPU per call (BENCHMARKS.md, "Cost per
//! call in flight"). It sits on the same crates reqwest does (`h2`, hyper's
//! `client::conn`, rustls with the webpki roots, hyper-util's proxy matcher).
//!
//! What it does:
//! - **HTTP/2** where the server offers it by ALPN (`http2 = "auto"` over TLS), or with
//!   prior knowledge (`"always"`: h2c over `http://`). Every call is a stream on one
//!   connection; only when every connection carries as many calls as the server allows
//!   at once (`SETTINGS_MAX_CONCURRENT_STREAMS`) is another opened. While a connection is
//!   being made, callers wait for it rather than each opening their own.
//! - **HTTP/1.1** otherwise: a pool of idle connections, the most recently used first,
//!   a connection going back to it once its response is read to the end.
//! - Idle connections are closed after the idle timeout; an HTTP/2 connection with calls
//!   in flight is pinged every [`H2_KEEP_ALIVE`]`.0` and dropped when a ping goes unanswered for
//!   [`H2_KEEP_ALIVE`]`.1`, so its calls fail as connection errors (and are retried)
//!   instead of waiting for their attempt timeouts.
//! - A request the server did not process is sent again, at most twice: a pooled
//!   connection that closed before the request was written, an HTTP/2 stream the server
//!   refused (`REFUSED_STREAM`) or a connection it was shutting down (`GOAWAY`). Nothing
//!   else is retried here: the resilience layer owns retries.
//! - Proxies from `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (as curl and
//!   reqwest read them): `https://` targets through a `CONNECT` tunnel, `http://` ones
//!   sent to the proxy in absolute form. Only `http://` proxies are supported.
//! - No redirects, no compression, no cookies.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::http::{CONNECT_TIMEOUT, H2_CONNECTION_WINDOW, H2_KEEP_ALIVE, H2_STREAM_WINDOW, Http2};
use super::{ErrorKind, ProviderError};

/// TCP keep-alive: idle time before the first probe, and between probes.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// How long a pooled HTTP/1.1 connection may take to be ready for another request: an
/// idle one is at once; one whose server stopped midway never is, and is dropped.
const READY_WAIT: Duration = Duration::from_secs(1);

/// How many times a request the server did not process is sent again.
const MAX_RESENDS: u32 = 2;

/// The most of a response's header block accepted (over HTTP/1.1, the most buffered
/// at once while reading it). API responses send 1–3 KiB.
const MAX_HEADER_LIST: u32 = 64 << 10;

/// A client of one HTTP endpoint. Clones share the connections.
#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoint and the headers every request carries, or why there are none (a bad
    /// URL or API key: every call fails with it, no connection is tried).
    setup: Result<Setup, ProviderError>,
    mode: Http2,
    idle_timeout: Duration,
    pool: Mutex<Pool>,
    /// Held while an HTTP/2 connection is being made (or one that may turn out so), so
    /// calls that find none wait for it rather than each opening one.
    connecting: tokio::sync::Mutex<()>,
}

struct Setup {
    target: Target,
    headers: HeaderMap,
    proxy: Option<Proxy>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Setup {
    /// One request's headers: the client's own, the call's `extra`, and those the
    /// protocol needs (`Host` over HTTP/1.1, `content-length` over HTTP/2).
    fn headers(
        &self,
        extra: Option<(&'static str, HeaderValue)>,
        h1: bool,
        length: usize,
    ) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 3);
        if h1 {
            headers.insert(header::HOST, self.target.host_header.clone());
            if let Some(auth) = self
                .proxy
                .as_ref()
                .filter(|p| p.forward)
                .and_then(|p| p.auth.clone())
            {
                headers.insert(header::PROXY_AUTHORIZATION, auth);
            }
        }
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        if !h1 {
            // HTTP/1.1 sets it from the body; some HTTP/2 front ends want it too.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        if let Some((name, value)) = extra {
            headers.insert(name, value);
        }
        headers
    }
}

/// Where requests go, parsed once.
struct Target {
    https: bool,
    /// For DNS and the TLS server name: no brackets around an IPv6 address.
    host: String,
    port: u16,
    /// `host[:port]` as written, without any user info: the `Host` header.
    host_header: HeaderValue,
    /// The absolute URI: HTTP/2's pseudo-headers, and HTTP/1.1 through a proxy.
    uri: Uri,
    /// Path and query: the HTTP/1.1 request target.
    path: PathAndQuery,
    /// The URL for error messages: no user info, no query.
    shown: String,
    /// Basic authorization from the URL's user info, marked sensitive.
    basic: Option<HeaderValue>,
}

struct Proxy {
    host: String,
    port: u16,
    /// `Proxy-Authorization`, from the proxy URL's user info.
    auth: Option<HeaderValue>,
    /// An `http://` target (not h2c) goes to the proxy in absolute form; everything else
    /// through a `CONNECT` tunnel.
    forward: bool,
}

#[derive(Default)]
struct Pool {
    /// HTTP/2 connections, the first with room for another stream taking each call.
    h2: Vec<SharedH2>,
    h1: Vec<IdleH1>,
    /// Over TLS with `http2 = "auto"`: the server chose HTTP/1.1 when last asked, so
    /// calls open connections of their own without waiting for one another.
    speaks_h1: bool,
    /// A task closes idle connections while the pool holds any.
    reaper: bool,
    /// The last connection that could not be made, and when: callers that waited for
    /// it take its error rather than each trying again in turn.
    failed: Option<(Instant, ProviderError)>,
    next_id: u64,
}

struct SharedH2 {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    last_used: Instant,
    /// The reaper saw calls on it last time: its idle time starts now.
    was_busy: bool,
    state: Arc<H2State>,
}

/// What an HTTP/2 connection's calls and its driver share.
#[derive(Default)]
struct H2State {
    /// Calls whose response has not been dropped: the connection is idle at zero.
    calls: AtomicUsize,
    /// Why the driver dropped the connection, for the errors of the calls it held.
    dropped: OnceLock<String>,
}

/// A call on an HTTP/2 connection, counted until its response is dropped.
struct Busy(Arc<H2State>);

impl Busy {
    fn new(state: &Arc<H2State>) -> Busy {
        state.calls.fetch_add(1, Ordering::Relaxed);
        Busy(state.clone())
    }

    /// An error of this call: the connection's fate added, if its driver dropped it.
    fn explain(&self, mut message: String) -> String {
        if let Some(why) = self.0.dropped.get() {
            message.push_str(" (");
            message.push_str(why);
            message.push(')');
        }
        message
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

struct IdleH1 {
    send: http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

enum Conn {
    H2(h2::client::SendRequest<Bytes>, u64, Busy),
    H1(http1::SendRequest<Full<Bytes>>),
}

/// Why a request failed.
enum Failed {
    /// The connection was found closed before the request went out on it.
    Stale(ProviderError),
    /// The server refused the request unprocessed.
    Unsent(ProviderError),
    /// Anything else: the server may have processed it.
    Fatal(ProviderError),
}

/// How many pooled connections found closed one call may go through before it gives
/// up (each is dropped from the pool as it is found).
const MAX_STALE: u32 = 8;

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("HttpClient");
        match &self.inner.setup {
            Ok(setup) => d.field("url", &setup.target.shown),
            Err(e) => d.field("error", &e.message),
        };
        d.field("http2", &self.inner.mode).finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client of `url`. `headers` go with every request (mark secrets sensitive);
    /// an error there, or a URL that cannot be called, is what every call returns.
    pub(crate) fn new(
        url: &str,
        mode: Http2,
        headers: Result<HeaderMap, ProviderError>,
        idle_timeout: Duration,
    ) -> Self {
        Self::build(
            url,
            mode,
            headers,
            idle_timeout,
            &Matcher::from_env(),
            tls_config,
        )
    }

    /// [`HttpClient::new`] with the proxies `proxies` names and the TLS setup `tls`
    /// makes for the mode.
    fn build(
        url: &str,
        mode: Http2,
        headers: Result<HeaderMap, ProviderError>,
        idle_timeout: Duration,
        proxies: &Matcher,
        tls: impl FnOnce(Http2) -> Result<Arc<rustls::ClientConfig>, ProviderError>,
    ) -> Self {
        let setup = headers.and_then(|mut headers| {
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static(concat!("metaorch/", env!("CARGO_PKG_VERSION"))),
            );
            headers
                .entry(header::ACCEPT)
                .or_insert(HeaderValue::from_static("*/*"));
            // The URL is not repeated: it may carry credentials.
            let target = Target::parse(url).map_err(|why| {
                ProviderError::new(
                    ErrorKind::BadRequest,
                    format!("the URL cannot be called: {why}"),
                )
            })?;
            // Credentials in the URL (`https://user:pass@gateway`) are sent as Basic
            // authorization, unless the provider sends its own, as reqwest did.
            if let Some(basic) = target.basic.clone() {
                headers.entry(header::AUTHORIZATION).or_insert(basic);
            }
            let proxy = Proxy::new(proxies, &target, mode)?;
            let tls = match target.https {
                true => Some(tls(mode)?),
                false => None,
            };
            Ok(Setup {
                target,
                headers,
                proxy,
                tls,
            })
        });
        HttpClient {
            inner: Arc::new(Inner {
                setup,
                mode,
                idle_timeout,
                pool: Mutex::new(Pool::default()),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// POSTs `body`, with `extra` headers besides the client's own, and returns once
    /// the response's headers are in.
    pub(crate) async fn post(
        &self,
        extra: Option<(&'static str, HeaderValue)>,
        body: Bytes,
    ) -> Result<Response, ProviderError> {
        let setup = self.inner.setup.as_ref().map_err(Clone::clone)?;
        let (mut resent, mut stale) = (0, 0);
        loop {
            let (conn, fresh) = self.inner.checkout(setup).await?;
            let sent = match conn {
                Conn::H2(send, id, busy) => {
                    self.inner
                        .send_h2(setup, send, id, busy, extra.clone(), body.clone())
                        .await
                }
                Conn::H1(send) => {
                    self.inner
                        .send_h1(setup, send, extra.clone(), body.clone())
                        .await
                }
            };
            match sent {
                Ok(response) => return Ok(response),
                // A pooled connection that closed while idle (a server restarting
                // drops them all at once) costs nothing of the resend budget.
                Err(Failed::Stale(_)) if !fresh && stale < MAX_STALE => stale += 1,
                Err(Failed::Stale(_) | Failed::Unsent(_)) if resent < MAX_RESENDS => resent += 1,
                Err(Failed::Stale(e) | Failed::Unsent(e) | Failed::Fatal(e)) => return Err(e),
            }
        }
    }

    /// The connections this client holds open now, idle or busy (tests).
    #[cfg(test)]
    fn pooled(&self) -> usize {
        let pool = self.inner.lock();
        pool.h1.len() + pool.h2.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the next connection may be HTTP/2, so callers should share it.
    fn may_be_h2(&self, setup: &Setup, pool: &Pool) -> bool {
        match self.mode {
            Http2::Always => true,
            Http2::Never => false,
            Http2::Auto => setup.target.https && !pool.speaks_h1,
        }
    }

    /// A connection to send on: the shared HTTP/2 one, an idle HTTP/1.1 one, or a new one.
    /// The connection, and whether it was made for this call.
    async fn checkout(self: &Arc<Self>, setup: &Setup) -> Result<(Conn, bool), ProviderError> {
        if let Some(conn) = self.pooled().await {
            return Ok((conn, false));
        }
        let may_be_h2 = self.may_be_h2(setup, &self.lock());
        if !may_be_h2 {
            return Ok((Box::pin(self.connect(setup)).await?, true));
        }
        let asked = Instant::now();
        let gate = self.connecting.lock().await;
        // Someone else may have connected while this call waited, or learned that the
        // server speaks HTTP/1.1, whose connections are not shared, or failed to
        // connect, which this call would only repeat.
        if let Some(conn) = self.pooled().await {
            // An HTTP/2 connection just made; an HTTP/1.1 one from the pool is not.
            let fresh = matches!(conn, Conn::H2(..));
            return Ok((conn, fresh));
        }
        if let Some((at, error)) = &self.lock().failed
            && *at >= asked
        {
            return Err(error.clone());
        }
        if !self.may_be_h2(setup, &self.lock()) {
            drop(gate);
        }
        Ok((Box::pin(self.connect(setup)).await?, true))
    }

    /// A pooled connection, if one is ready.
    async fn pooled(&self) -> Option<Conn> {
        loop {
            let idle = {
                let mut pool = self.lock();
                // A connection has room while its calls are fewer than the streams the
                // server allows at once; when none has, another is opened rather than
                // calls waiting in h2's queue for a stream, unseen by flow control.
                let room = pool.h2.iter_mut().find(|h2| {
                    h2.state.calls.load(Ordering::Relaxed) < h2.send.current_max_send_streams()
                });
                if let Some(h2) = room {
                    h2.last_used = Instant::now();
                    return Some(Conn::H2(h2.send.clone(), h2.id, Busy::new(&h2.state)));
                }
                if !pool.h2.is_empty() {
                    return None;
                }
                pool.h1.pop()?
            };
            // Ready once the connection has finished its last response; an error means
            // the server closed it while it sat idle.
            let mut send = idle.send;
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, send.ready()).await {
                return Some(Conn::H1(send));
            }
        }
    }

    fn forget_h2(&self, id: u64) {
        let mut pool = self.lock();
        pool.h2.retain(|h2| h2.id != id);
    }

    fn give_back(self: &Arc<Self>, send: http1::SendRequest<Full<Bytes>>) {
        if send.is_closed() {
            return;
        }
        let mut pool = self.lock();
        pool.h1.push(IdleH1 {
            send,
            since: Instant::now(),
        });
        self.start_reaper(&mut pool);
    }

    /// Starts the task that closes connections idle for longer than the idle timeout;
    /// it ends when the pool is empty or the client is gone.
    fn start_reaper(self: &Arc<Self>, pool: &mut Pool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if pool.reaper {
            return;
        }
        pool.reaper = true;
        let client = Arc::downgrade(self);
        /// Lets the next connection start a reaper again if this one's task ends in
        /// any way, its runtime shutting down included.
        struct Off(Weak<Inner>);
        impl Drop for Off {
            fn drop(&mut self) {
                if let Some(inner) = self.0.upgrade() {
                    inner.lock().reaper = false;
                }
            }
        }
        let off = Off(client.clone());
        let every = (self.idle_timeout / 4).max(Duration::from_millis(10));
        runtime.spawn(async move {
            let mut off = off;
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = client.upgrade() else {
                    return;
                };
                let mut pool = inner.lock();
                let now = Instant::now();
                let idle = inner.idle_timeout;
                pool.h1
                    .retain(|c| !c.send.is_closed() && now.duration_since(c.since) < idle);
                // Dropping the last handle lets h2 close the connection once its
                // streams are done.
                pool.h2.retain_mut(|h2| {
                    // Idle time counts from the first look that finds no call on it.
                    let busy = h2.state.calls.load(Ordering::Relaxed) > 0;
                    if busy || h2.was_busy {
                        h2.last_used = now;
                    }
                    h2.was_busy = busy;
                    busy || now.duration_since(h2.last_used) < idle
                });
                if pool.h1.is_empty() && pool.h2.is_empty() {
                    // Under the lock, so a connection given back now starts another.
                    pool.reaper = false;
                    off.0 = Weak::new();
                    return;
                }
            }
        });
    }

    /// Opens a connection; an HTTP/2 one goes into the pool for every caller.
    async fn connect(self: &Arc<Self>, setup: &Setup) -> Result<Conn, ProviderError> {
        let made = tokio::time::timeout(CONNECT_TIMEOUT, self.handshake(setup)).await;
        let made = made.unwrap_or_else(|_| {
            Err(ProviderError::new(
                ErrorKind::Timeout,
                format!(
                    "error sending request for url ({}): no connection within {} s",
                    setup.target.shown,
                    CONNECT_TIMEOUT.as_secs()
                ),
            ))
        });
        let conn = match made {
            Ok(conn) => conn,
            Err(error) => {
                self.lock().failed = Some((Instant::now(), error.clone()));
                return Err(error);
            }
        };
        match conn {
            Handshaken::H2(send, connection) => {
                let mut pool = self.lock();
                pool.next_id += 1;
                let id = pool.next_id;
                let state = Arc::new(H2State::default());
                let busy = Busy::new(&state);
                pool.h2.push(SharedH2 {
                    id,
                    send: send.clone(),
                    last_used: Instant::now(),
                    was_busy: true,
                    state: state.clone(),
                });
                self.start_reaper(&mut pool);
                drop(pool);
                tokio::spawn(drive_h2(*connection, state, Arc::downgrade(self), id));
                Ok(Conn::H2(send, id, busy))
            }
            Handshaken::H1(send, speaks_h1) => {
                if speaks_h1 {
                    self.lock().speaks_h1 = true;
                }
                Ok(Conn::H1(send))
            }
        }
    }

    async fn handshake(&self, setup: &Setup) -> Result<Handshaken, ProviderError> {
        let target = &setup.target;
        let failed = |why: String| {
            ProviderError::new(
                ErrorKind::Connection,
                format!("error sending request for url ({}): {why}", target.shown),
            )
        };
        let tcp = match &setup.proxy {
            None => tcp_connect(&target.host, target.port).await,
            Some(proxy) => tcp_connect(&proxy.host, proxy.port).await.map_err(|mut e| {
                e.message = format!("the proxy: {}", e.message);
                e
            }),
        };
        let mut tcp = tcp.map_err(|e| {
            let mut error = failed(e.message);
            if e.timed_out {
                error.kind = ErrorKind::Timeout;
            }
            error
        })?;
        if let Some(proxy) = setup.proxy.as_ref().filter(|p| !p.forward) {
            tunnel(&mut tcp, target, proxy.auth.as_ref())
                .await
                .map_err(failed)?;
        }
        // Calls are small requests answered after a while: send them at once. Probes
        // find a path that died in silence (a NAT or load balancer forgetting the
        // connection), which HTTP/1.1 has no pings for: as reqwest set them.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE)
            .with_interval(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let (io, h2) = match &setup.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| failed(format!("TLS: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| failed(format!("TLS handshake: {}", error_chain(&e))))?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                if self.mode == Http2::Always && !h2 {
                    return Err(failed(
                        "the server does not offer HTTP/2 (http2 = \"always\"); set http2 = \"auto\""
                            .to_owned(),
                    ));
                }
                (Io::Tls(Box::new(tls)), h2)
            }
            None => (Io::Plain(tcp), self.mode == Http2::Always),
        };
        if h2 {
            let (send, connection) = h2::client::Builder::new()
                .enable_push(false)
                .initial_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_header_list_size(MAX_HEADER_LIST)
                // Until the server's SETTINGS say how many streams it takes at once,
                // the 100 RFC 9113 asks servers to allow at least: a new connection
                // takes no more calls than that before it knows.
                .initial_max_send_streams(100)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|e| failed(format!("HTTP/2 handshake: {}", error_chain(&e))))?;
            Ok(Handshaken::H2(send, Box::new(connection)))
        } else {
            let (send, connection) = http1::Builder::new()
                .max_buf_size(MAX_HEADER_LIST as usize)
                .handshake::<_, Full<Bytes>>(TokioIo::new(io))
                .await
                .map_err(|e| failed(format!("HTTP/1.1 handshake: {}", error_chain(&e))))?;
            tokio::spawn(async move {
                // The connection's error, if any, reaches the call it was serving.
                let _ = connection.await;
            });
            Ok(Handshaken::H1(
                send,
                setup.tls.is_some() && self.mode == Http2::Auto,
            ))
        }
    }

    async fn send_h2(
        &self,
        setup: &Setup,
        send: h2::client::SendRequest<Bytes>,
        id: u64,
        busy: Busy,
        extra: Option<(&'static str, HeaderValue)>,
        body: Bytes,
    ) -> Result<Response, Failed> {
        // The connection is gone (closed, shutting down, broken): the request never left,
        // and another connection takes it. Anything else (h2 refusing the request
        // itself) is this call's failure, and the connection stays.
        let unsent = |e: h2::Error| {
            let error = transport_error(&setup.target, &e);
            if e.is_io() || e.is_go_away() || e.reason().is_some() {
                self.forget_h2(id);
                Failed::Stale(error)
            } else {
                Failed::Fatal(error)
            }
        };
        let mut send = send.ready().await.map_err(unsent)?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = setup.target.uri.clone();
        *request.headers_mut() = setup.headers(extra, false, body.len());
        let end = body.is_empty();
        let (response, mut stream) = send.send_request(request, end).map_err(unsent)?;
        drop(send);
        if !end {
            stream
                .send_data(body, true)
                .map_err(|e| Failed::Fatal(transport_error(&setup.target, &e)))?;
        }
        drop(stream);
        let response = response.await.map_err(|e| {
            let refused = e.is_remote()
                && ((e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
                    || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)));
            if e.is_go_away() || e.is_io() {
                self.forget_h2(id);
            }
            let mut error = transport_error(&setup.target, &e);
            error.message = busy.explain(error.message);
            if refused {
                Failed::Unsent(error)
            } else {
                Failed::Fatal(error)
            }
        })?;
        let (parts, body) = response.into_parts();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body: Body::H2 { body, busy },
        })
    }

    async fn send_h1(
        self: &Arc<Self>,
        setup: &Setup,
        mut send: http1::SendRequest<Full<Bytes>>,
        extra: Option<(&'static str, HeaderValue)>,
        body: Bytes,
    ) -> Result<Response, Failed> {
        let length = body.len();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = match setup.proxy.as_ref().is_some_and(|p| p.forward) {
            true => setup.target.uri.clone(),
            false => Uri::from(setup.target.path.clone()),
        };
        *request.headers_mut() = setup.headers(extra, true, length);
        match send.try_send_request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                Ok(Response {
                    status: parts.status,
                    headers: parts.headers,
                    body: Body::H1 {
                        body,
                        reuse: Some((send, self.clone())),
                    },
                })
            }
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let error = transport_error(&setup.target, e.error());
                Err(match unsent {
                    true => Failed::Stale(error),
                    false => Failed::Fatal(error),
                })
            }
        }
    }
}

enum Handshaken {
    H2(
        h2::client::SendRequest<Bytes>,
        Box<h2::client::Connection<Io, Bytes>>,
    ),
    /// The sender, and whether this tells that the server speaks HTTP/1.1 only.
    H1(http1::SendRequest<Full<Bytes>>, bool),
}

/// Drives an HTTP/2 connection: pings it while it lives, drops it when a ping goes
/// unanswered, and takes it out of the pool when it ends.
async fn drive_h2(
    mut connection: h2::client::Connection<Io, Bytes>,
    state: Arc<H2State>,
    client: Weak<Inner>,
    id: u64,
) {
    let (every, patience) = H2_KEEP_ALIVE;
    let mut pings = connection.ping_pong();
    let mut next = Instant::now() + every;
    let mut awaiting = false;
    loop {
        tokio::select! {
            _ = &mut connection => break,
            pong = poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => Poll::Pending,
            }), if awaiting => match pong {
                Ok(_) => {
                    awaiting = false;
                    next = Instant::now() + every;
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep_until(next) => {
                if awaiting {
                    // Unanswered: the connection is dead, and so are its calls.
                    let _ = state.dropped.set(format!(
                        "the connection was dropped: no answer to a ping within {} s",
                        patience.as_secs()
                    ));
                    break;
                }
                if state.calls.load(Ordering::Relaxed) == 0 {
                    // Nothing in flight to protect; an idle connection is left to the
                    // idle timeout.
                    next = Instant::now() + every;
                    continue;
                }
                match pings.as_mut().map(|p| p.send_ping(h2::Ping::opaque())) {
                    Some(Ok(())) => {
                        awaiting = true;
                        next = Instant::now() + patience;
                    }
                    Some(Err(_)) => break,
                    None => next = Instant::now() + every,
                }
            }
        }
    }
    if let Some(inner) = client.upgrade() {
        inner.forget_h2(id);
    }
}

/// A response whose headers are in; the body is read with [`Response::chunk`].
pub(crate) struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
}

enum Body {
    /// The stream, and the call counted on its connection until the body is dropped.
    H2 { body: h2::RecvStream, busy: Busy },
    /// With the connection, which goes back to the pool once the body is read to its end.
    H1 {
        body: hyper::body::Incoming,
        reuse: Option<(http1::SendRequest<Full<Bytes>>, Arc<Inner>)>,
    },
}

impl Response {
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body's length, if the server said it.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    }

    /// The next piece of the body; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        match &mut self.body {
            Body::H2 { body, busy } => match body.data().await {
                Some(Ok(data)) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    Ok(Some(data))
                }
                Some(Err(e)) => Err(BodyError(busy.explain(error_chain(&e)))),
                None => Ok(None),
            },
            Body::H1 { body, reuse } => loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            return Ok(Some(data));
                        }
                    }
                    Some(Err(e)) => return Err(BodyError(error_chain(&e))),
                    None => {
                        if let Some((send, client)) = reuse.take() {
                            client.give_back(send);
                        }
                        return Ok(None);
                    }
                }
            },
        }
    }
}

impl Drop for Response {
    /// A body left before its end — a stream read up to its closing event, an error
    /// body cut at its cap — may still be whole in the connection's buffer: once the
    /// connection says it is ready for another request, it goes back to the pool, as
    /// if read to the end. hyper closes it instead if the rest never came.
    fn drop(&mut self) {
        if let Body::H1 { body, reuse } = &mut self.body
            && let Some((mut send, client)) = reuse.take()
            && !send.is_closed()
        {
            // What already arrived is read now: a body whose end came with it is done,
            // and its connection free for the next call at once.
            loop {
                match body.frame().now_or_never() {
                    Some(Some(Ok(_))) => {}
                    Some(None) => return client.give_back(send),
                    Some(Some(Err(_))) => return,
                    None => break,
                }
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                let idle = client.idle_timeout;
                if let Ok(Ok(())) = tokio::time::timeout(idle, send.ready()).await {
                    client.give_back(send);
                }
            });
        }
    }
}

/// A body that broke off: the connection dropped, was reset, or ended short.
#[derive(Debug)]
pub(crate) struct BodyError(pub String);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn transport_error(target: &Target, error: &dyn std::error::Error) -> ProviderError {
    ProviderError::new(
        ErrorKind::Connection,
        format!(
            "error sending request for url ({}): {}",
            target.shown,
            error_chain(error)
        ),
    )
}

/// An error and its sources, `: `-separated, without repeating a source whose text the
/// error's own already ends with.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        let https = match parsed.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("the scheme is {other}, not http or https")),
        };
        let basic = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            use base64::Engine as _;
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let pair = format!(
                "{}:{}",
                decode(parsed.username()),
                decode(parsed.password().unwrap_or(""))
            );
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|_| "its user info cannot go in a header".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        };
        let written = parsed.host_str().ok_or("the URL has no host")?;
        let port = parsed
            .port_or_known_default()
            .ok_or("the URL has no port")?;
        let authority = match parsed.port() {
            Some(port) => format!("{written}:{port}"),
            None => written.to_owned(),
        };
        let path = match parsed.query() {
            Some(query) => format!("{}?{query}", parsed.path()),
            None => parsed.path().to_owned(),
        };
        let scheme = if https { Scheme::HTTPS } else { Scheme::HTTP };
        let shown = format!("{scheme}://{authority}{}", parsed.path());
        let authority: Authority = authority.parse().map_err(|e| format!("{e}"))?;
        let path: PathAndQuery = path.parse().map_err(|e| format!("{e}"))?;
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query(path.clone())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Target {
            https,
            host: written
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            host_header: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
            uri,
            path,
            shown,
            basic,
        })
    }
}

/// Why every call to `url` would fail for the proxy the environment (`env`) names for
/// it, if it would: only `http://` proxies are supported. The variables are read as
/// the client reads them, upper case first.
pub fn proxy_problem(url: &str, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let target = Target::parse(url).ok()?;
    // Under CGI no variable is read: `HTTP_PROXY` may be a request's header there, and
    // the matcher leaves them all.
    if env("REQUEST_METHOD").is_some() {
        return None;
    }
    let first = |names: [&str; 2]| names.into_iter().find_map(&env);
    let mut proxies = Matcher::builder();
    if let Some(all) = first(["ALL_PROXY", "all_proxy"]) {
        proxies = proxies.all(all);
    }
    if let Some(https) = first(["HTTPS_PROXY", "https_proxy"]) {
        proxies = proxies.https(https);
    }
    if let Some(http) = first(["HTTP_PROXY", "http_proxy"]) {
        proxies = proxies.http(http);
    }
    if let Some(no) = first(["NO_PROXY", "no_proxy"]) {
        proxies = proxies.no(no);
    }
    Proxy::new(&proxies.build(), &target, Http2::Auto)
        .err()
        .map(|e| e.message)
}

impl Proxy {
    /// The proxy `proxies` names for `target`, if any.
    fn new(
        proxies: &Matcher,
        target: &Target,
        mode: Http2,
    ) -> Result<Option<Proxy>, ProviderError> {
        // A proxy cannot reach this machine's loopback (its own would answer): as Go's
        // clients do, loopback hosts are never proxied.
        let loopback = target.host.eq_ignore_ascii_case("localhost")
            || target
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(None);
        }
        let Some(intercept) = proxies.intercept(&target.uri) else {
            return Ok(None);
        };
        let uri = intercept.uri();
        let unsupported = || {
            ProviderError::new(
                ErrorKind::BadRequest,
                format!(
                    "the proxy for {} ({}://{}) is not supported: only http:// proxies are; \
                     set NO_PROXY to reach it directly",
                    target.shown,
                    uri.scheme_str().unwrap_or(""),
                    uri.host().unwrap_or("")
                ),
            )
        };
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(unsupported());
        }
        let host = uri.host().ok_or_else(unsupported)?;
        Ok(Some(Proxy {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: uri.port_u16().unwrap_or(80),
            auth: intercept.basic_auth().cloned().map(|mut v| {
                v.set_sensitive(true);
                v
            }),
            forward: !target.https && mode != Http2::Always,
        }))
    }
}

/// How long the first address family has alone before the other joins the race.
const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(300);

/// Why no TCP connection was made. The addresses tried are left out of the text: it
/// can reach a `serve` client, and internal addresses are not theirs to see.
struct ConnectFailed {
    message: String,
    /// Every address tried went unanswered: a timeout, not a refusal.
    timed_out: bool,
}

impl ConnectFailed {
    fn join(first: ConnectFailed, second: ConnectFailed) -> ConnectFailed {
        ConnectFailed {
            message: if first.message == second.message {
                first.message
            } else {
                format!("{}; {}", first.message, second.message)
            },
            timed_out: first.timed_out && second.timed_out,
        }
    }
}

/// Connects to the first of the host's addresses that answers. Addresses of the family
/// DNS listed first are tried in order; if the host has both IPv6 and IPv4 addresses,
/// the other family starts [`HAPPY_EYEBALLS_DELAY`] later, or as soon as the first has
/// failed (RFC 8305), so a network where one family is broken costs a fraction of a
/// second, not the connect timeout. Each address has an even share of
/// [`CONNECT_TIMEOUT`].
async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ConnectFailed> {
    let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ConnectFailed {
            message: format!("dns error: {e}"),
            timed_out: false,
        })?
        .collect();
    let Some(first) = addresses.first() else {
        return Err(ConnectFailed {
            message: "dns error: no address found".to_owned(),
            timed_out: false,
        });
    };
    let share = CONNECT_TIMEOUT / u32::try_from(addresses.len()).unwrap_or(u32::MAX).max(1);
    let (preferred, other): (Vec<_>, Vec<_>) = addresses
        .iter()
        .partition(|a| a.is_ipv6() == first.is_ipv6());
    let preferred = connect_in_turn(preferred, share);
    if other.is_empty() {
        return preferred.await;
    }
    tokio::pin!(preferred);
    tokio::select! {
        done = &mut preferred => {
            return match done {
                Ok(tcp) => Ok(tcp),
                Err(first) => connect_in_turn(other, share)
                    .await
                    .map_err(|second| ConnectFailed::join(first, second)),
            };
        }
        _ = tokio::time::sleep(HAPPY_EYEBALLS_DELAY) => {}
    }
    let other = connect_in_turn(other, share);
    tokio::pin!(other);
    tokio::select! {
        done = &mut preferred => match done {
            Ok(tcp) => Ok(tcp),
            Err(first) => other.await.map_err(|second| ConnectFailed::join(first, second)),
        },
        done = &mut other => match done {
            Ok(tcp) => Ok(tcp),
            Err(second) => preferred.await.map_err(|first| ConnectFailed::join(first, second)),
        },
    }
}

async fn connect_in_turn(
    addresses: Vec<&std::net::SocketAddr>,
    share: Duration,
) -> Result<TcpStream, ConnectFailed> {
    let mut last = ConnectFailed {
        message: String::new(),
        timed_out: false,
    };
    let mut timed_out = !addresses.is_empty();
    for &address in addresses {
        match tokio::time::timeout(share, TcpStream::connect(address)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => {
                timed_out &= e.kind() == io::ErrorKind::TimedOut;
                last.message = format!("tcp connect error: {e}");
            }
            Err(_) => {
                last.message = format!(
                    "tcp connect error: no answer within {} ms",
                    share.as_millis()
                );
            }
        }
    }
    last.timed_out = timed_out;
    Err(last)
}

/// Asks an HTTP proxy for a tunnel to the target (`CONNECT host:port`).
async fn tunnel(
    tcp: &mut TcpStream,
    target: &Target,
    auth: Option<&HeaderValue>,
) -> Result<(), String> {
    let to = match target.host.contains(':') {
        true => format!("[{}]:{}", target.host, target.port),
        false => format!("{}:{}", target.host, target.port),
    };
    let mut ask = format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n").into_bytes();
    if let Some(auth) = auth {
        ask.extend_from_slice(b"Proxy-Authorization: ");
        ask.extend_from_slice(auth.as_bytes());
        ask.extend_from_slice(b"\r\n");
    }
    ask.extend_from_slice(b"\r\n");
    let broke = |e: io::Error| format!("proxy tunnel: {e}");
    tcp.write_all(&ask).await.map_err(broke)?;
    // The proxy's answer is a status line and headers, no body; read up to its end.
    let mut answer = Vec::with_capacity(256);
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= 8 << 10 {
            return Err("proxy tunnel: the proxy's answer has no end".to_owned());
        }
        let byte = tcp.read_u8().await.map_err(broke)?;
        answer.push(byte);
    }
    let status = answer
        .split(|&b| b == b'\r')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    match status.split(' ').nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(format!("the proxy refused the tunnel: {}", status.trim())),
    }
}

/// The variable naming a PEM file of certificates to trust besides the web's roots.
pub const CA_FILE_VARIABLE: &str = "SSL_CERT_FILE";

/// The TLS setup for a mode: the web's root certificates (as browsers trust them), and
/// those of the PEM file `SSL_CERT_FILE` names (a company's own CA, a TLS-inspecting
/// proxy's), read once; and the ALPN protocols the mode offers.
fn tls_config(mode: Http2) -> Result<Arc<rustls::ClientConfig>, ProviderError> {
    static CONFIGS: OnceLock<Result<[Arc<rustls::ClientConfig>; 3], String>> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        let file = std::env::var_os(CA_FILE_VARIABLE).filter(|f| !f.is_empty());
        let roots = roots(file.as_deref().map(std::path::Path::new))?;
        Ok([
            tls_config_with(roots.clone(), Http2::Auto)?,
            tls_config_with(roots.clone(), Http2::Always)?,
            tls_config_with(roots, Http2::Never)?,
        ])
    });
    let configs = configs
        .as_ref()
        // A setup that cannot be made fails every call alike: not worth a retry.
        .map_err(|e| ProviderError::new(ErrorKind::BadRequest, format!("TLS setup: {e}")))?;
    Ok(configs[match mode {
        Http2::Auto => 0,
        Http2::Always => 1,
        Http2::Never => 2,
    }]
    .clone())
}

/// Why the file `SSL_CERT_FILE` names (in `env`) cannot serve, if it is set and cannot:
/// every `https://` call would fail.
pub fn ca_file_problem(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let file = env(CA_FILE_VARIABLE).filter(|f| !f.is_empty())?;
    roots(Some(std::path::Path::new(&file))).err()
}

/// The web's roots, and every certificate in the PEM file `extra`, if given.
fn roots(extra: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Some(path) = extra else {
        return Ok(roots);
    };
    let named = |why: String| format!("{CA_FILE_VARIABLE}={}: {why}", path.display());
    let pem = std::fs::read(path).map_err(|e| named(e.to_string()))?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| named(format!("not a PEM file of certificates ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| named(format!("a certificate cannot be trusted ({e})")))?;
        added += 1;
    }
    if added == 0 {
        return Err(named("no certificate in it".to_owned()));
    }
    Ok(roots)
}

fn tls_config_with(
    roots: rustls::RootCertStore,
    mode: Http2,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let alpn: &[&[u8]] = match mode {
        Http2::Auto => &[b"h2", b"http/1.1"],
        Http2::Always => &[b"h2"],
        Http2::Never => &[b"http/1.1"],
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A connection's byte stream: plain TCP or TLS over it.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_upstream::{MockOptions, MockUpstream};

    const BODY: &[u8] =
        br#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;

    fn json() -> Result<HeaderMap, ProviderError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-api-key", HeaderValue::from_static("test"));
        Ok(headers)
    }

    async fn call(client: &HttpClient) -> (StatusCode, Vec<u8>) {
        let mut response = client.post(None, Bytes::from_static(BODY)).await.unwrap();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        (response.status(), body)
    }

    /// The error of a call that must fail to connect.
    async fn connection_error(client: &HttpClient) -> ProviderError {
        let error = client
            .post(None, Bytes::from_static(BODY))
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind, ErrorKind::Connection, "{}", error.message);
        error
    }

    /// `n` calls at once, each read to its end.
    async fn calls_at_once(client: &HttpClient, n: usize) -> Vec<(StatusCode, Vec<u8>)> {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..n {
            let client = client.clone();
            calls.spawn(async move { call(&client).await });
        }
        calls.join_all().await
    }

    /// The connections a burst opened leave the pool once idle for its timeout.
    #[tokio::test]
    async fn the_idle_pool_shrinks() {
        let options = MockOptions {
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(200),
            ..MockOptions::default()
        };
        let mock = MockUpstream::start(([127, 0, 0, 1], 0).into(), options)
            .await
            .unwrap();
        let url = format!("{}/v1/messages", mock.url());
        for (http2, burst) in [(Http2::Never, 5), (Http2::Always, 1)] {
            let before = mock.stats();
            let client = HttpClient::new(&url, http2, json(), Duration::from_millis(200));
            for (status, body) in calls_at_once(&client, 5).await {
                assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            }
            let after = mock.stats();
            let opened = after.connections_accepted - before.connections_accepted;
            assert!((1..=burst).contains(&opened), "{http2}: {opened} opened");
            assert_eq!(after.connections_open, opened, "{http2}: kept idle");
            assert_eq!(client.pooled() as u64, opened, "{http2}: pooled");
            // Reused while warm: five more calls, one after another, open nothing.
            for _ in 0..5 {
                call(&client).await;
            }
            assert_eq!(
                mock.stats().connections_accepted,
                after.connections_accepted
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while mock.stats().connections_open > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                mock.stats().connections_open,
                0,
                "{http2}: closed when idle"
            );
            assert_eq!(client.pooled(), 0, "{http2}: the pool is empty");
        }
        mock.stop().await;
    }

    const CA: &[u8] = include_bytes!("../../tests/fixtures/tls/ca.pem");
    const CERT: &[u8] = include_bytes!("../../tests/fixtures/tls/cert.pem");
    const KEY: &[u8] = include_bytes!("../../tests/fixtures/tls/key.pem");

    /// What a test TLS server saw: the connections it accepted and the HTTP version of
    /// each request.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        versions: Mutex<Vec<http::Version>>,
        authorization: Mutex<Vec<Option<HeaderValue>>>,
    }

    /// A TLS server on 127.0.0.1 with the test certificate, offering `alpn`, answering
    /// every request with a small JSON body after 50 ms.
    async fn tls_server(alpn: &[&[u8]]) -> (u16, Arc<Seen>) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(CERT).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(KEY).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let server = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                server.connections.fetch_add(1, Ordering::Relaxed);
                let (acceptor, seen) = (acceptor.clone(), server.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        seen.versions.lock().unwrap().push(request.version());
                        let authorization = request.headers().get(header::AUTHORIZATION);
                        seen.authorization
                            .lock()
                            .unwrap()
                            .push(authorization.cloned());
                        async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(br#"{"ok":true}"#),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        (port, seen)
    }

    fn trusting_the_test_ca(url: &str, mode: Http2) -> HttpClient {
        through(url, mode, &Matcher::builder().build())
    }

    /// A client trusting the test CA, going through the proxies `proxies` names.
    fn through(url: &str, mode: Http2, proxies: &Matcher) -> HttpClient {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        HttpClient::build(
            url,
            mode,
            json(),
            Duration::from_secs(30),
            proxies,
            |mode| {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(CA).unwrap())
                    .unwrap();
                Ok(tls_config_with(roots, mode).unwrap())
            },
        )
    }

    /// A `CONNECT` proxy on 127.0.0.1 that records each request's head.
    async fn tunnel_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        head.push(client.read_u8().await.unwrap());
                    }
                    let head = String::from_utf8(head).unwrap();
                    seen.lock().unwrap().push(head.clone());
                    let to = head
                        .split(' ')
                        .nth(1)
                        .unwrap()
                        .replace("upstream.test", "127.0.0.1");
                    let Ok(mut upstream) = TcpStream::connect(&to).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (port, heads)
    }

    /// An `https://` target is reached through a `CONNECT` tunnel (with the proxy's
    /// credentials), TLS and HTTP/2 inside it; an `http://` one is sent to the proxy
    /// in absolute form; a host in `NO_PROXY`, or a loopback one, is reached directly;
    /// a proxy that refuses the tunnel is named in the error.
    #[tokio::test]
    async fn proxies_are_used_as_the_environment_says() {
        let (proxy, heads) = tunnel_proxy().await;
        let (port, seen) = tls_server(&[b"h2", b"http/1.1"]).await;
        let proxies = Matcher::builder()
            .https(format!("http://user:pa55@127.0.0.1:{proxy}"))
            .build();
        let url = format!("https://upstream.test:{port}/v1/messages");
        let client = through(&url, Http2::Auto, &proxies);
        for _ in 0..2 {
            assert_eq!(call(&client).await.0, StatusCode::OK);
        }
        assert_eq!(
            seen.versions.lock().unwrap().clone(),
            vec![http::Version::HTTP_2; 2]
        );
        let asked = heads.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "one tunnel for both calls: {asked:?}");
        assert!(
            asked[0].starts_with(&format!("CONNECT upstream.test:{port} HTTP/1.1\r\n"))
                && asked[0].contains("Proxy-Authorization: Basic dXNlcjpwYTU1\r\n"),
            "{}",
            asked[0]
        );

        // No proxy for a host NO_PROXY names (so `upstream.test` is looked up, and is
        // not found), nor for a loopback host, whatever the variables say.
        let proxies = Matcher::builder()
            .https(format!("http://127.0.0.1:{proxy}"))
            .no("upstream.test")
            .build();
        let direct = through(&url, Http2::Auto, &proxies);
        assert!(direct.post(None, Bytes::from_static(BODY)).await.is_err());
        let local = format!("https://localhost:{port}/v1/messages");
        let proxies = Matcher::builder()
            .https(format!("http://127.0.0.1:{proxy}"))
            .build();
        assert_eq!(
            call(&through(&local, Http2::Auto, &proxies)).await.0,
            StatusCode::OK
        );
        assert_eq!(heads.lock().unwrap().len(), 1);

        // Plain http: the request goes to the proxy, its target in absolute form (the
        // mock answers it as if it were the server).
        let mock = MockUpstream::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
            .await
            .unwrap();
        let proxies = Matcher::builder().http(mock.url()).build();
        let client = through("http://upstream.invalid/v1/messages", Http2::Auto, &proxies);
        let (status, body) = call(&client).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        mock.stop().await;

        // A tunnel the proxy refuses.
        let proxies = Matcher::builder()
            .https(format!("http://127.0.0.1:{proxy}"))
            .build();
        let client = through("https://upstream.test:1/v1/messages", Http2::Auto, &proxies);
        let error = connection_error(&client).await;
        assert!(
            error
                .message
                .contains("the proxy refused the tunnel: HTTP/1.1 502 Bad Gateway"),
            "{}",
            error.message
        );
    }

    /// Over TLS, `auto` speaks HTTP/2 when the server offers it by ALPN (every call a
    /// stream on one connection) and HTTP/1.1 when it does not; `never` keeps to
    /// HTTP/1.1; `always` refuses a server without HTTP/2, saying so.
    #[tokio::test]
    async fn tls_speaks_what_alpn_agrees() {
        let both: &[&[u8]] = &[b"h2", b"http/1.1"];
        let h1: &[&[u8]] = &[b"http/1.1"];
        for (offered, mode, version, host) in [
            (both, Http2::Auto, http::Version::HTTP_2, "localhost"),
            (h1, Http2::Auto, http::Version::HTTP_11, "127.0.0.1"),
            (both, Http2::Never, http::Version::HTTP_11, "127.0.0.1"),
            (both, Http2::Always, http::Version::HTTP_2, "127.0.0.1"),
        ] {
            let (port, seen) = tls_server(offered).await;
            let client = trusting_the_test_ca(&format!("https://{host}:{port}/v1/messages"), mode);
            for (status, body) in calls_at_once(&client, 4).await {
                assert_eq!(
                    (status, &body[..]),
                    (StatusCode::OK, &br#"{"ok":true}"#[..])
                );
            }
            let versions = seen.versions.lock().unwrap().clone();
            assert_eq!(versions, vec![version; 4], "{mode} against {offered:?}");
            let connections = seen.connections.load(Ordering::Relaxed);
            if version == http::Version::HTTP_2 {
                assert_eq!(connections, 1, "{mode}: the calls shared one connection");
            } else {
                assert!(
                    connections > 1,
                    "{mode}: HTTP/1.1 calls in parallel, {connections}"
                );
            }
        }

        // A server that leaves ALPN out (one that knows it, and no h2, refuses the
        // handshake with `NoApplicationProtocol`).
        let (port, _) = tls_server(&[]).await;
        let client = trusting_the_test_ca(
            &format!("https://127.0.0.1:{port}/v1/messages"),
            Http2::Always,
        );
        let error = connection_error(&client).await;
        assert!(
            error.message.contains("does not offer HTTP/2"),
            "{}",
            error.message
        );
    }

    /// A server whose certificate the web's roots do not vouch for is refused, and the
    /// error says why; calls waiting for that connection share its error.
    #[tokio::test]
    async fn tls_refuses_an_unknown_issuer() {
        let (port, seen) = tls_server(&[b"h2", b"http/1.1"]).await;
        let url = format!("https://127.0.0.1:{port}/v1/messages");
        let client = HttpClient::new(&url, Http2::Auto, json(), Duration::from_secs(30));
        // Five calls at once: the four that waited for the first one's connection take
        // its error instead of each trying again.
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let client = client.clone();
            calls.spawn(async move { client.post(None, Bytes::from_static(BODY)).await });
        }
        while let Some(done) = calls.join_next().await {
            let error = done.unwrap().err().unwrap();
            assert_eq!(error.kind, ErrorKind::Connection);
            assert!(
                error.message.contains(&url) && error.message.contains("UnknownIssuer"),
                "{}",
                error.message
            );
        }
        assert_eq!(seen.connections.load(Ordering::Relaxed), 1);
        assert!(seen.versions.lock().unwrap().is_empty());
        // A later call tries again.
        client
            .post(None, Bytes::from_static(BODY))
            .await
            .err()
            .unwrap();
        assert_eq!(seen.connections.load(Ordering::Relaxed), 2);
    }

    /// Over HTTP/2, a stream the server refused (`REFUSED_STREAM`) is sent again, and
    /// a connection the server shut down (`GOAWAY`) is replaced: neither reaches the
    /// caller as a failure.
    #[tokio::test]
    async fn refused_streams_and_closed_connections_are_sent_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams = Arc::new(AtomicUsize::new(0));
        let seen = streams.clone();
        tokio::spawn(async move {
            let mut connections = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                connections += 1;
                let first = connections == 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    let mut answered = 0;
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let n = seen.fetch_add(1, Ordering::Relaxed);
                        if n == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let response = http::Response::new(());
                        let mut body = respond.send_response(response, false).unwrap();
                        body.send_data(Bytes::from_static(b"{}"), true).unwrap();
                        answered += 1;
                        if first && answered == 1 {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        let url = format!("http://127.0.0.1:{port}/v1/messages");
        let client = HttpClient::new(&url, Http2::Always, json(), Duration::from_secs(30));
        for _ in 0..3 {
            let (status, body) = call(&client).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"{}"[..]));
        }
        assert_eq!(
            streams.load(Ordering::Relaxed),
            4,
            "one refused, three answered"
        );
    }

    /// An HTTP/2 connection that stops answering is found by its ping: the calls on it
    /// fail as connection errors (which the resilience layer retries) within the
    /// keep-alive interval and timeout, instead of waiting for their attempt timeouts,
    /// and the next call opens a new connection.
    #[tokio::test(start_paused = true)]
    async fn a_silent_http2_connection_is_found_by_its_ping() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            // Accepts, reads nothing, answers nothing.
            let mut sockets = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                sockets.push(tcp);
            }
        });
        let url = format!("http://127.0.0.1:{port}/v1/messages");
        let client = HttpClient::new(&url, Http2::Always, json(), Duration::from_secs(300));
        let started = Instant::now();
        let error = client
            .post(None, Bytes::from_static(BODY))
            .await
            .err()
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(error.kind, ErrorKind::Connection, "{}", error.message);
        assert!(
            error.message.contains("no answer to a ping within 10 s"),
            "{}",
            error.message
        );
        let (every, patience) = H2_KEEP_ALIVE;
        assert!(
            waited >= every && waited <= every + patience + Duration::from_secs(1),
            "failed after {waited:?}: {}",
            error.message
        );
        tokio::task::yield_now().await;
        assert_eq!(client.pooled(), 0, "the dead connection left the pool");
        held.abort();
    }

    /// When every HTTP/2 connection carries as many calls as the server allows at once,
    /// the next call opens another connection rather than waiting in the client for a
    /// stream.
    #[tokio::test]
    async fn a_full_http2_connection_is_joined_by_another() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (release, released) = tokio::sync::watch::channel(false);
        let pending = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen_pending, seen_connections) = (pending.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                seen_connections.fetch_add(1, Ordering::Relaxed);
                let (pending, released) = (seen_pending.clone(), released.clone());
                tokio::spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(2)
                        .handshake::<_, Bytes>(tcp)
                        .await
                        .unwrap();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let (pending, mut released) = (pending.clone(), released.clone());
                        tokio::spawn(async move {
                            pending.fetch_add(1, Ordering::Relaxed);
                            let _ = released.wait_for(|r| *r).await;
                            let response = http::Response::new(());
                            let mut body = respond.send_response(response, false).unwrap();
                            body.send_data(Bytes::from_static(b"{}"), true).unwrap();
                        });
                    }
                });
            }
        });
        let url = format!("http://127.0.0.1:{port}/v1/messages");
        let client = HttpClient::new(&url, Http2::Always, json(), Duration::from_secs(30));
        // One call first: its connection then knows the server's cap of two streams.
        release.send_replace(true);
        assert_eq!(call(&client).await.0, StatusCode::OK);
        release.send_replace(false);
        pending.store(0, Ordering::Relaxed);

        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let client = client.clone();
            calls.spawn(async move { call(&client).await });
        }
        // All four reach the server at once: two on each connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pending.load(Ordering::Relaxed) < 4 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            pending.load(Ordering::Relaxed),
            4,
            "calls waited for a stream"
        );
        release.send_replace(true);
        while let Some(done) = calls.join_next().await {
            assert_eq!(done.unwrap().0, StatusCode::OK);
        }
        assert_eq!(connections.load(Ordering::Relaxed), 2);
        assert_eq!(client.pooled(), 2);
    }

    /// A streamed HTTP/1.1 reply left at its closing event (before the body's own end)
    /// gives its connection back to the pool all the same.
    #[tokio::test]
    async fn a_stream_left_at_its_last_event_keeps_its_connection() {
        let options = MockOptions {
            latency_min: Duration::ZERO,
            latency_max: Duration::ZERO,
            ..MockOptions::default()
        };
        let mock = MockUpstream::start(([127, 0, 0, 1], 0).into(), options)
            .await
            .unwrap();
        let url = format!("{}/v1/messages", mock.url());
        let client = HttpClient::new(&url, Http2::Never, json(), Duration::from_secs(30));
        let streamed = br#"{"model":"m","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        for _ in 0..3 {
            let mut response = client
                .post(None, Bytes::from_static(streamed))
                .await
                .unwrap();
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("message_stop") {
                seen.extend_from_slice(&response.chunk().await.unwrap().unwrap());
            }
            drop(response);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while client.pooled() == 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(client.pooled(), 1, "the connection went back to the pool");
        }
        assert_eq!(mock.stats().connections_accepted, 1);
        mock.stop().await;
    }

    /// Credentials in the URL are sent as Basic authorization (percent-decoded), never
    /// shown: not in an error, not in `Debug`.
    #[tokio::test]
    async fn credentials_in_the_url_authorize_and_never_show() {
        let (port, seen) = tls_server(&[b"h2", b"http/1.1"]).await;
        let url = format!("https://user:p%40ss@127.0.0.1:{port}/v1/messages");
        let client = trusting_the_test_ca(&url, Http2::Auto);
        assert_eq!(call(&client).await.0, StatusCode::OK);
        let sent = seen.authorization.lock().unwrap().clone();
        // user:p@ss
        assert_eq!(
            sent,
            vec![Some(HeaderValue::from_static("Basic dXNlcjpwQHNz"))]
        );
        assert!(!format!("{client:?}").contains("p%40ss"), "{client:?}");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://user:p%40ss@127.0.0.1:{}/v1/messages",
            closed.local_addr().unwrap().port()
        );
        drop(closed);
        let client = HttpClient::new(&url, Http2::Never, json(), Duration::from_secs(30));
        let error = connection_error(&client).await;
        assert!(
            !error.message.contains("p%40ss") && !error.message.contains("user"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("tcp connect error"),
            "{}",
            error.message
        );
    }

    /// A response dropped outside any runtime (its connection's end already read) does
    /// not panic.
    #[test]
    fn a_response_dropped_outside_a_runtime_is_fine() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let options = MockOptions {
            latency_min: Duration::ZERO,
            latency_max: Duration::ZERO,
            ..MockOptions::default()
        };
        let (mock, client, response) = runtime.block_on(async {
            let mock = MockUpstream::start(([127, 0, 0, 1], 0).into(), options)
                .await
                .unwrap();
            let url = format!("{}/v1/messages", mock.url());
            let client = HttpClient::new(&url, Http2::Never, json(), Duration::from_secs(30));
            let mut response = client.post(None, Bytes::from_static(BODY)).await.unwrap();
            let length = response.content_length().unwrap() as usize;
            let mut read = 0;
            while read < length {
                read += response.chunk().await.unwrap().unwrap().len();
            }
            // Let the body's end arrive, unread.
            tokio::time::sleep(Duration::from_millis(50)).await;
            (mock, client, response)
        });
        drop(response);
        assert_eq!(
            client.pooled(),
            1,
            "back in the pool, with no reaper to start"
        );
        runtime.block_on(mock.stop());
    }

    /// `config check` learns of a proxy calls cannot go through before any call does.
    #[test]
    fn an_unsupported_proxy_is_named_before_any_call() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let url = "https://api.anthropic.com/v1/messages";
        let socks = env(&[("HTTPS_PROXY", "socks5://10.0.0.1:1080")]);
        let problem = proxy_problem(url, socks).unwrap();
        assert!(problem.contains("only http:// proxies"), "{problem}");
        let bypassed = env(&[
            ("https_proxy", "https://10.0.0.1:3128"),
            ("NO_PROXY", "anthropic.com"),
        ]);
        assert_eq!(proxy_problem(url, bypassed), None);
        let fine = env(&[("HTTPS_PROXY", "http://10.0.0.1:3128")]);
        assert_eq!(proxy_problem(url, fine), None);
        assert_eq!(proxy_problem(url, env(&[])), None);
    }

    /// The certificates of the file `SSL_CERT_FILE` names are trusted besides the web's
    /// roots; a file that cannot serve is named in the error.
    #[tokio::test]
    async fn a_ca_file_is_trusted_besides_the_webs_roots() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, CA).unwrap();
        let with_ca = roots(Some(&file)).unwrap();
        assert_eq!(with_ca.len(), webpki_roots::TLS_SERVER_ROOTS.len() + 1);
        let (port, _) = tls_server(&[b"h2", b"http/1.1"]).await;
        let url = format!("https://localhost:{port}/v1/messages");
        let client = HttpClient::build(
            &url,
            Http2::Auto,
            json(),
            Duration::from_secs(30),
            &Matcher::builder().build(),
            |mode| Ok(tls_config_with(with_ca, mode).unwrap()),
        );
        assert_eq!(call(&client).await.0, StatusCode::OK);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = roots(Some(&empty)).err().unwrap();
        assert!(
            error.starts_with("SSL_CERT_FILE=") && error.ends_with("no certificate in it"),
            "{error}"
        );
        let missing = roots(Some(&dir.path().join("missing.pem"))).err().unwrap();
        assert!(missing.contains("missing.pem"), "{missing}");
    }
}
