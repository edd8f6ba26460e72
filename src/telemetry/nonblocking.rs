//! A log writer that never blocks the thread that logs: lines go into a bounded queue,
//! and one thread of its own writes them to the file or stderr.
//!
//! The tokio workers of `serve` log on every request; a slow disk, a full pipe or a
//! stopped terminal must not stall them. When the queue is full, the line is dropped
//! and counted (`metaorch_log_lines_dropped_total`), and once the writer catches up it
//! writes one `log.dropped` line saying how many were lost. Dropping beats blocking:
//! a server that stops answering because its log is slow loses far more than lines.
//!
//! (`tracing-appender` has such a writer, but would bring the `time` and
//! `crossbeam-channel` crates for what a `std` channel and a thread do here, and its
//! drops would be counted but never logged.)

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds before new ones are dropped: at a typical 400 bytes a line,
/// about 6 MiB — seconds of a busy server's logging, minutes of a quiet one's.
pub(crate) const QUEUE_LINES: usize = 16 * 1024;

/// How long dropping the guard waits for the queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Set once the process is ending: until then a line finding the queue full waits for
/// room instead of being dropped. The lines that say why and how a process stopped
/// are the ones read first; losing them to the backlog of a busy minute is the worst
/// trade. Bounded, so a writer that never drains cannot hold the exit.
static CLOSING_UNTIL: OnceLock<Instant> = OnceLock::new();

/// From now on, and for at most [`FLUSH_WAIT`], log lines wait for room in the queue
/// rather than being dropped: the process is stopping and its last lines matter most.
pub(crate) fn keep_last_lines() {
    let _ = CLOSING_UNTIL.set(Instant::now() + FLUSH_WAIT);
}

/// What the log writer's thread is sent.
enum Message {
    Line(Vec<u8>),
    /// Write everything queued before this, flush, and answer.
    Flush(SyncSender<()>),
}

/// How the `log.dropped` line is written: as JSON or as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    Json,
    Text,
}

/// The writer the log layers write to (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct NonBlocking {
    tx: SyncSender<Message>,
    /// Lines dropped and not yet reported in a `log.dropped` line.
    unreported: Arc<AtomicU64>,
}

/// Keeps the writer's thread; dropping it writes what is queued (waiting up to two
/// seconds, so a stuck disk cannot hold the process at exit).
#[derive(Debug)]
pub(crate) struct LogGuard {
    tx: SyncSender<Message>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NonBlocking {
    /// A writer to `sink` through a queue of `capacity` lines, and the guard of its
    /// thread.
    pub(crate) fn new(
        sink: Box<dyn Write + Send>,
        capacity: usize,
        notice: Notice,
    ) -> io::Result<(NonBlocking, LogGuard)> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let unreported = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&unreported);
        let thread = std::thread::Builder::new()
            .name("metaorch-log".into())
            .spawn(move || write_lines(rx, sink, &counter, notice))?;
        Ok((
            NonBlocking {
                tx: tx.clone(),
                unreported,
            },
            LogGuard {
                tx,
                thread: Some(thread),
            },
        ))
    }

    fn send(&self, line: &[u8]) {
        let mut message = Message::Line(line.to_vec());
        loop {
            match self.tx.try_send(message) {
                Ok(()) => return,
                Err(TrySendError::Full(m))
                    if CLOSING_UNTIL.get().is_some_and(|&t| Instant::now() < t) =>
                {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.unreported.fetch_add(1, Ordering::Relaxed);
                    super::metrics::log_lines_dropped(1);
                    return;
                }
            }
        }
    }
}

/// One event's writer: the layers write each line whole, in one call.
#[derive(Debug)]
pub(crate) struct LineWriter<'a>(&'a NonBlocking);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter(self)
    }
}

/// The writer thread: writes lines as they come, flushing whenever the queue runs dry,
/// and reports drops once it has caught up.
fn write_lines(
    rx: Receiver<Message>,
    sink: Box<dyn Write + Send>,
    unreported: &AtomicU64,
    notice: Notice,
) {
    let mut out = BufWriter::with_capacity(64 << 10, sink);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                // A failed write has nowhere to be reported but the log itself.
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(ack) => {
                    report_drops(&mut out, unreported, notice);
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        report_drops(&mut out, unreported, notice);
        let _ = out.flush();
    }
}

/// Writes the `log.dropped` line when lines were dropped since the last one.
fn report_drops(out: &mut impl Write, unreported: &AtomicU64, notice: Notice) {
    let dropped = unreported.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = out.write_all(dropped_line(dropped, notice).as_bytes());
    }
}

/// The line that says `n` lines were lost.
fn dropped_line(n: u64, notice: Notice) -> String {
    let now = humantime::format_rfc3339_micros(SystemTime::now());
    let message = format!(
        "{n} log lines dropped: the log's writer (a slow disk or pipe) fell behind and its queue of {QUEUE_LINES} lines was full"
    );
    match notice {
        Notice::Json => format!(
            "{{\"timestamp\":\"{now}\",\"level\":\"WARN\",\"message\":\"{message}\",\"event\":\"log.dropped\",\"trace_id\":null,\"target\":\"metaorch::telemetry\",\"dropped\":{n}}}\n"
        ),
        Notice::Text => format!("{now}  WARN metaorch::telemetry: {message}\n"),
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut flush = Message::Flush(ack_tx);
        // The queue may be full: retry until there is room, within the deadline.
        loop {
            match self.tx.try_send(flush) {
                Ok(()) => {
                    let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
                    break;
                }
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    flush = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
        // The global subscriber keeps a sender for the life of the process, so the
        // thread never sees the channel close: it is left to end with the process.
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    /// A sink that blocks every write until opened, then collects what is written.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<GateState>, Condvar)>);

    #[derive(Default)]
    struct GateState {
        open: bool,
        entered: bool,
        written: Vec<u8>,
    }

    impl Gate {
        fn wait_entered(&self) {
            let (lock, cv) = &*self.0;
            drop(cv.wait_while(lock.lock().unwrap(), |s| !s.entered).unwrap());
        }
        fn open(&self) {
            self.0.0.lock().unwrap().open = true;
            self.0.1.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.0.0.lock().unwrap().written.clone()).unwrap()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut state = lock.lock().unwrap();
            state.entered = true;
            cv.notify_all();
            let mut state = cv.wait_while(state, |s| !s.open).unwrap();
            state.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_logger_and_drops_are_counted_then_reported() {
        let gate = Gate::default();
        let (writer, guard) = NonBlocking::new(Box::new(gate.clone()), 4, Notice::Json).unwrap();
        writer.make_writer().write_all(b"first\n").unwrap();
        // The thread is now stuck writing it: the queue takes four lines, no more.
        gate.wait_entered();
        for i in 0..100 {
            // With a blocking writer this would never return: the gate is shut.
            writer
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        assert_eq!(writer.unreported.load(Ordering::Relaxed), 96);
        gate.open();
        drop(guard);
        let text = gate.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..5],
            ["first", "line 0", "line 1", "line 2", "line 3"]
        );
        let notice: serde_json::Value = serde_json::from_str(lines[5]).unwrap();
        assert_eq!(notice["event"], "log.dropped");
        assert_eq!(notice["dropped"], 96);
        assert_eq!(notice["level"], "WARN");
        assert_eq!(lines.len(), 6);
        assert_eq!(
            writer.unreported.load(Ordering::Relaxed),
            0,
            "reported once"
        );
    }
}
