//! `KeyBuffer::next_key` throughput and latency, 1 and 2 threads.
//!
//! Run: `cargo bench -p kgs-consumer --bench next_key`. Each sample gets a
//! fresh buffer filled (outside the timing) with enough 10-character keys
//! for every thread; the time reported is per key per thread, so 2 threads
//! at `t` ns/key hand out `2 / t` keys per ns.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kgs_consumer::KeyBuffer;

/// Keys per pushed batch: the producer's largest batches.
const BATCH: usize = 50_000;

fn filled(keys: &[String], total: u64, lanes: usize) -> KeyBuffer {
    let buffer = KeyBuffer::new(lanes);
    let batches = (total as usize).div_ceil(BATCH) + 1;
    for i in 0..batches {
        // The same keys under other batch ids: uniqueness is not the point here.
        buffer.push(&format!("b{i}"), keys).expect("push");
    }
    buffer
}

fn next_key(c: &mut Criterion) {
    let keys: Vec<String> = (0..BATCH).map(|i| format!("k{i:09}")).collect();
    let mut group = c.benchmark_group("next_key");
    for threads in [1usize, 2] {
        // Per iteration every thread takes one key: thrpt is the total rate.
        group.throughput(Throughput::Elements(threads as u64));
        let keys = keys.clone();
        group.bench_function(format!("{threads}_threads"), move |b| {
            b.iter_custom(|iters| {
                let buffer = Arc::new(filled(&keys, iters * threads as u64, threads));
                let start = Arc::new(Barrier::new(threads));
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let buffer = Arc::clone(&buffer);
                        let start = Arc::clone(&start);
                        std::thread::spawn(move || {
                            start.wait();
                            let t = Instant::now();
                            for _ in 0..iters {
                                black_box(buffer.next_key().expect("buffer is big enough"));
                            }
                            t.elapsed()
                        })
                    })
                    .collect();
                // The slowest thread's time: the wall time of the whole run.
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .max()
                    .unwrap_or(Duration::ZERO)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, next_key);
criterion_main!(benches);
