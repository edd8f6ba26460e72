//! Throughput of `metaorch trace`'s scanner: how many MB of JSON log per second it
//! reads, a block at a time as from a file, while picking out one request, by trace id
//! and by `--last`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use metaorch::telemetry::timeline::{Scanner, Select};

const FIXTURE: &str = include_str!("../tests/fixtures/two_requests.log");
const FIRST: &str = "fd999d32df3044a401874b424b2b8a03";
const SECOND: &str = "f536d78c5875e597258d1ad1f4e1e884";

/// About 16 MB of real log lines: the fixture's requests repeated under fresh trace
/// ids, with the wanted request in the middle.
fn log() -> (Vec<u8>, String) {
    let lines: Vec<&str> = FIXTURE
        .lines()
        .filter(|l| l.starts_with("{\"timestamp") && l.ends_with('}'))
        .collect();
    let mut out = Vec::with_capacity(17 << 20);
    let wanted = format!("{:032x}", 0x5eed_u128);
    let mut i: u128 = 1;
    while out.len() < 16 << 20 {
        let id = if i == 10_000 {
            wanted.clone()
        } else {
            format!("{:032x}", i * 0x9e37_79b9_7f4a_7c15)
        };
        for line in &lines {
            out.extend_from_slice(line.replace(FIRST, &id).replace(SECOND, &id).as_bytes());
            out.push(b'\n');
        }
        i += 1;
    }
    (out, wanted)
}

fn scan(log: &[u8], select: Select) -> usize {
    let mut scanner = Scanner::new(select);
    scanner.read(log).expect("a slice reads");
    scanner.finish().map_or(0, |t| t.agents.len())
}

fn bench(c: &mut Criterion) {
    let (log, wanted) = log();
    let mut group = c.benchmark_group("trace_scan");
    group.throughput(Throughput::Bytes(log.len() as u64));
    group.sample_size(20);
    group.bench_function("by_trace_id", |b| {
        b.iter(|| scan(black_box(&log), Select::Trace(wanted.clone())))
    });
    group.bench_function("last", |b| b.iter(|| scan(black_box(&log), Select::Last)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
