//! A fork-join team for the hot kernels: helper threads that spin briefly between jobs.
//!
//! Why not rayon: a decoding step runs ~200 matrix products of 0.05-0.5 ms each, separated by
//! short serial ops. Rayon's idle workers go to sleep within microseconds, so every product pays
//! a futex wake-up, and on a 2-core machine 2 threads were measured only 1.2-1.4x faster than 1.
//! Here helpers spin for [`SPIN`] after each job (as OpenMP and ggml's thread pools do), then park.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(300);

type Job = dyn Fn(usize, usize) + Sync;

fn spin_limit() -> Duration {
    static S: OnceLock<Duration> = OnceLock::new();
    *S.get_or_init(|| {
        std::env::var("MEET_SPIN_US").ok().and_then(|v| v.parse().ok()).map(Duration::from_micros).unwrap_or(SPIN)
    })
}

struct Shared {
    /// Bumped for every job; helpers wait for it to change.
    epoch: AtomicUsize,
    /// Helpers still working on the current job.
    pending: AtomicUsize,
    /// The current job, valid while `pending > 0` (the caller waits for that).
    job: UnsafeCell<Option<&'static Job>>,
    panicked: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
    /// The calling thread plus the helpers actually running (set once they are spawned).
    threads: AtomicUsize,
}

// Safety: `job` is written only by the caller holding `Team::busy`, before `epoch` is bumped
// (release), and read by helpers after they observe the bump (acquire).
unsafe impl Sync for Shared {}

/// A raw pointer to an output that team threads write in disjoint parts (rows, column ranges).
pub struct SharedMut<T>(pub *mut T);

// Safety: every user writes only elements no other thread touches, and the output outlives the
// `run` call that spreads the writes; the elements themselves must be sendable to other threads.
unsafe impl<T: Send> Sync for SharedMut<T> {}

/// A fixed team of `threads - 1` helpers plus the calling thread.
pub struct Team {
    shared: Arc<Shared>,
    busy: Mutex<()>,
}

thread_local! {
    /// The team (its `Shared`'s address) whose job this thread is running, 0 when none: a call
    /// from inside a job is nested and runs inline.
    static IN_JOB: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as running a job of `team` until dropped.
struct JobMark(usize);

impl JobMark {
    fn enter(team: usize) -> Self {
        Self(IN_JOB.with(|c| c.replace(team)))
    }
}

impl Drop for JobMark {
    fn drop(&mut self) {
        IN_JOB.with(|c| c.set(self.0));
    }
}

fn helper(shared: Arc<Shared>, index: usize) {
    // A helper only ever runs this team's jobs.
    let _mark = JobMark::enter(Arc::as_ptr(&shared) as usize);
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > spin_limit() {
                let guard = shared.park.lock().unwrap_or_else(|p| p.into_inner());
                if shared.epoch.load(Ordering::Acquire) == seen {
                    let _g =
                        shared.wake.wait_timeout(guard, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner());
                }
            } else {
                std::hint::spin_loop();
            }
        }
        // Safety: the job stays valid until this helper decrements `pending`.
        if let Some(job) = unsafe { *shared.job.get() } {
            let threads = shared.threads.load(Ordering::Acquire);
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index, threads))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Team {
    /// A team of `threads` (the caller and `threads - 1` helpers). A helper the OS refuses to
    /// start is not waited for: the team runs with the helpers it got (and says so), so a failed
    /// spawn costs speed, never a hang.
    fn new(threads: usize) -> Self {
        let wanted = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
            threads: AtomicUsize::new(1),
        });
        let mut running = 1;
        for i in 1..wanted {
            let s = shared.clone();
            // Helpers are numbered by the order they started in, so the indices stay 1..running.
            match std::thread::Builder::new().name(format!("meet-team-{i}")).spawn(move || helper(s, i)) {
                Ok(_) => running += 1,
                Err(e) => {
                    tracing::warn!("could not start kernel thread {i} of {wanted} ({e}); running on {running}");
                    break;
                }
            }
        }
        shared.threads.store(running, Ordering::Release);
        Self { shared, busy: Mutex::new(()) }
    }

    /// The process-wide team, sized by `RAYON_NUM_THREADS` or the available cores.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let n = std::env::var("MEET_THREADS")
                .or_else(|_| std::env::var("RAYON_NUM_THREADS"))
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Team::new(n)
        })
    }

    /// Threads that run a job.
    pub fn threads(&self) -> usize {
        self.shared.threads.load(Ordering::Acquire)
    }

    /// Runs `f(index, threads)` once on every thread of the team and returns when all are done.
    ///
    /// A nested call (from inside one of this team's jobs) runs `f(0, 1)` on the calling thread.
    /// A concurrent call from another thread while the team is busy runs `f(0, n)` .. `f(n-1, n)`
    /// one after another on the calling thread: the same split as the team's, so the same bits
    /// whatever else is running in the process (two tests side by side, say), only slower.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let me = Arc::as_ptr(&self.shared) as usize;
        if IN_JOB.with(|c| c.get()) == me {
            f(0, 1);
            return;
        }
        let Ok(_busy) = self.busy.try_lock() else {
            let _mark = JobMark::enter(me);
            let n = self.threads();
            (0..n).for_each(|i| f(i, n));
            return;
        };
        let n = self.threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        // Safety: the reference outlives its use: we wait below until no helper holds it.
        let job: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(f) };
        // Safety: only the caller holding `busy` writes `job`, while no helper reads it (the
        // last job's `pending` reached 0 and the epoch is not bumped yet).
        unsafe { *self.shared.job.get() = Some(job) };
        self.shared.pending.store(n - 1, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        {
            let _g = self.shared.park.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _mark = JobMark::enter(me);
            f(0, n)
        }));
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // Safety: every helper has finished with the job (`pending` is 0).
        unsafe { *self.shared.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a meet-team helper panicked");
        }
    }

    /// Splits `0..n` into one contiguous range per thread, in multiples of `align`, and runs
    /// `f(range)` on each.
    pub fn for_ranges(&self, n: usize, align: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let align = align.max(1);
        self.run(&|i, t| {
            let units = n.div_ceil(align);
            let (a, b) = (units * i / t * align, (units * (i + 1) / t * align).min(n));
            if a < b {
                f(a..b);
            }
        });
    }
}

impl Team {
    /// Runs `f(range)` over `0..n` in chunks of `chunk` that threads take in turn, so a thread
    /// that starts late (or runs slower) does less of the work.
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        let next = AtomicUsize::new(0);
        self.run(&|_, _| loop {
            let a = next.fetch_add(chunk, Ordering::Relaxed);
            if a >= n {
                break;
            }
            f(a..(a + chunk).min(n));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        let team = Team::new(3);
        for n in [0, 1, 5, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.for_ranges(n, 4, &|r| {
                r.for_each(|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn chunks_cover_everything_once() {
        let team = Team::new(2);
        let hits: Vec<AtomicUsize> = (0..1001).map(|_| AtomicUsize::new(0)).collect();
        team.for_chunks(1001, 16, &|r| {
            r.for_each(|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            })
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn nested_calls_run_inline() {
        let team = Team::new(2);
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            team.run(&|_, t| {
                assert_eq!(t, 1);
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    /// A call from another thread while the team is busy gets the team's split, not one range.
    #[test]
    fn concurrent_calls_keep_the_split() {
        let team = Team::new(2);
        let (inside, outside) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
        let started = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                team.run(&|i, t| {
                    inside.lock().unwrap().push((i, t));
                    if i == 0 {
                        started.store(true, Ordering::Release);
                        while !done.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                    }
                })
            });
            while !started.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            team.for_ranges(10, 1, &|r| outside.lock().unwrap().push(r));
            done.store(true, Ordering::Release);
        });
        let mut inside = inside.into_inner().unwrap();
        inside.sort();
        assert_eq!(inside, [(0, 2), (1, 2)]);
        assert_eq!(outside.into_inner().unwrap(), [0..5, 5..10]);
    }
}
