//! [`KeelRuntime`]: openraft's Tokio runtime with one change, where its randomness
//! comes from.
//!
//! openraft draws election timeouts and tick phases from `AsyncRuntime::thread_rng`.
//! In production that is fresh randomness on every call, as with `TokioRuntime`. A
//! deterministic simulation (one current-thread runtime, paused time) calls
//! [`seed_thread`] first: every later draw on that thread comes from one generator
//! seeded there, so a run repeats exactly from its seed. Everything else (spawning,
//! timers, channels) is Tokio's, unchanged.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::impls::TokioRuntime;
use openraft::rt::{AsyncRuntime, OptionalSend};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

thread_local! {
    /// The simulation's seed source on this thread, if one was set.
    static SEEDED: RefCell<Option<SmallRng>> = const { RefCell::new(None) };
}

/// Makes every later `thread_rng` draw on this thread deterministic, derived from
/// `seed` (`None` returns to fresh randomness). For simulations only: production never
/// calls it.
pub fn seed_thread(seed: Option<u64>) {
    SEEDED.with(|s| *s.borrow_mut() = seed.map(SmallRng::seed_from_u64));
}

/// openraft's Tokio runtime with seedable randomness (see the module docs).
#[derive(Debug)]
pub struct KeelRuntime(TokioRuntime);

impl AsyncRuntime for KeelRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = SmallRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let seeded = SEEDED.with(|s| s.borrow_mut().as_mut().map(|r| r.random::<u64>()));
        SmallRng::seed_from_u64(seeded.unwrap_or_else(rand::random))
    }

    type Mpsc = <TokioRuntime as AsyncRuntime>::Mpsc;
    type Watch = <TokioRuntime as AsyncRuntime>::Watch;
    type Oneshot = <TokioRuntime as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::Mutex<T>;

    fn new(threads: usize) -> Self {
        KeelRuntime(TokioRuntime::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn draws() -> Vec<u64> {
        (0..4).map(|_| KeelRuntime::thread_rng().next_u64()).collect()
    }

    #[test]
    fn a_seeded_thread_draws_the_same_sequence_again_and_an_unseeded_one_does_not() {
        seed_thread(Some(42));
        let first = draws();
        seed_thread(Some(42));
        assert_eq!(draws(), first, "the same seed must give the same draws");
        seed_thread(Some(43));
        assert_ne!(draws(), first, "another seed must give other draws");
        seed_thread(None);
        assert_ne!(draws(), draws(), "without a seed every draw is fresh");
    }
}
