//! A real `redis-server` for one test: on 127.0.0.1, on a port of its own, keeping
//! nothing on disk, killed when dropped. It can be killed, paused and restarted on the
//! same port, for the outage tests.
//!
//! Where `redis-server` is not installed, [`RedisServer::start`] returns `None` and
//! the test skips (see [`skip`]) — unless `METAORCH_REQUIRE_REDIS` or `CI` is set, as
//! `.ci/run` sets them: then it panics, naming `scripts/test-deps.sh`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
const STARTUP: Duration = Duration::from_secs(10);

/// A `redis-server` process this test owns.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Extra arguments (`--requirepass`, …), given again on restart.
    args: Vec<String>,
    /// The running process; `None` while stopped.
    child: Option<Child>,
    /// Its working directory and log, removed on drop.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A new server answering PING, or `None` where `redis-server` is not installed
    /// (a panic instead when `METAORCH_REQUIRE_REDIS` or `CI` is set).
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// [`RedisServer::start`] with extra `redis-server` arguments, such as
    /// `["--requirepass", "pw"]`.
    pub fn start_with(args: &[&str]) -> Option<RedisServer> {
        if !installed() {
            assert!(
                !required(),
                "redis-server is not installed and METAORCH_REQUIRE_REDIS or CI is set; run scripts/test-deps.sh first"
            );
            return None;
        }
        let mut server = RedisServer {
            port: 0,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        // A port free a moment ago may be taken by the time redis-server binds it:
        // then another is picked.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return Some(server);
            }
        }
        panic!(
            "redis-server did not start on any of 5 free ports; see {}",
            server.log().display()
        );
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it gracefully (SIGTERM) and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            child.wait().expect("redis-server exits");
        }
    }

    /// Kills it (SIGKILL), as a crash would, and waits until it has exited.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing is answered, as with
    /// a server stuck or overloaded.
    pub fn freeze(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGSTOP);
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGCONT);
    }

    /// Starts it again on the same port (empty, since it keeps nothing), after a
    /// [`stop`](Self::stop) or [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}; see {}",
            self.port,
            self.log().display()
        );
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the process and waits for its PING; false if it exited first (its
    /// port was taken).
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--logfile", &self.log().display().to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if answers_ping(self.port) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "redis-server on port {} did not answer PING within {STARTUP:?}; see {}",
            self.port,
            self.log().display()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Prints that `test` is skipped for want of `redis-server`.
pub fn skip(test: &str) {
    println!("SKIPPED {test}: redis-server not installed; run scripts/test-deps.sh");
}

fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn required() -> bool {
    ["METAORCH_REQUIRE_REDIS", "CI"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty() && v != "0" && v != "false"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// Whether a Redis listens on `port`: any reply to PING counts (`+PONG`, or
/// `-NOAUTH` from a server with a password).
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 1];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read(&mut reply).is_ok_and(|n| n == 1)
        && matches!(reply[0], b'+' | b'-')
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // kill(2) on the pid of a child this fixture owns and has not reaped.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}
