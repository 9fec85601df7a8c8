//! Loom model check of the durable watermark (run with
//! `RUSTFLAGS="--cfg loom" cargo test -p keel-storage --test loom_watermark --release`).
//!
//! An appender stores entries into slots, then publishes the watermark; readers that
//! observe watermark `w` — by polling or by waiting — must see every slot below `w`
//! filled. The slots use `Relaxed` stores and loads on purpose: all ordering must come
//! from the watermark's own `Release`/`Acquire` publication, which is what the log's
//! readers rely on. Weakening `Watermark::advance` to `Relaxed` makes this test fail.
#![cfg(loom)]

use keel_storage::watermark::Watermark;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

const SLOTS: usize = 2;

/// Bounded preemptions keep the model check to seconds while still covering every
/// interleaving of up to this many forced context switches (loom's recommended use).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

#[test]
fn readers_that_see_the_watermark_see_every_entry_below_it() {
    model(|| {
        let slots: Arc<Vec<AtomicU64>> = Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
        let mark = Arc::new(Watermark::new(0));

        let appender = {
            let (slots, mark) = (slots.clone(), mark.clone());
            thread::spawn(move || {
                for i in 0..SLOTS {
                    slots[i].store(100 + i as u64, Ordering::Relaxed);
                    // Publish after each entry, as a flush covering one entry would.
                    mark.advance(i as u64 + 1);
                }
            })
        };
        let poller = {
            let (slots, mark) = (slots.clone(), mark.clone());
            thread::spawn(move || {
                let w = mark.get();
                for i in 0..w as usize {
                    assert_eq!(slots[i].load(Ordering::Relaxed), 100 + i as u64, "entry {i} below watermark {w} is not visible");
                }
            })
        };
        // A waiter blocks until entry 2 is durable, then reads everything below.
        let w = mark.wait_for(2).expect("the watermark is never closed here");
        assert!(w >= 2);
        for i in 0..w as usize {
            assert_eq!(slots[i].load(Ordering::Relaxed), 100 + i as u64);
        }
        appender.join().unwrap();
        poller.join().unwrap();
    });
}

#[test]
fn closing_the_watermark_releases_a_waiter_with_an_error() {
    model(|| {
        let mark = Arc::new(Watermark::new(0));
        let closer = {
            let mark = mark.clone();
            thread::spawn(move || mark.close())
        };
        assert!(mark.wait_for(5).is_err(), "a waiter for an entry that will never be durable is released");
        closer.join().unwrap();
    });
}
