//! Small helpers with no home of their own.

/// A random u64 from the kernel (session tokens, instance ids, PSNs).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // `getrandom` retries an interrupted call and falls back where the syscall is missing;
    // a process with no random source at all cannot make unguessable tokens, so it stops
    // here (the binding reports a panic as ERR_INTERNAL) instead of retrying forever.
    if let Err(e) = getrandom::getrandom(&mut bytes) {
        panic!("the operating system's random source failed ({e}): kvtransfer needs it for session tokens and nonces");
    }
    u64::from_ne_bytes(bytes)
}

/// `0..n` shuffled by a xorshift generator seeded with `seed`: the same scattered block ids
/// on every run, for the crate's benches and tests (`internals::scattered_ids`).
pub fn scattered_ids(n: u32, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n).collect();
    let mut state = seed | 1;
    for i in (1..ids.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.swap(i, (state % (i as u64 + 1)) as usize);
    }
    ids
}

/// Poison-tolerant lock: a panicked holder leaves plain data behind, never a broken
/// invariant that a later holder could trip over.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Poison-tolerant shared lock (see [`lock`]).
pub(crate) fn read<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Poison-tolerant exclusive lock (see [`lock`]).
pub(crate) fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Poison-tolerant `Condvar::wait` (see [`lock`]).
pub(crate) fn wait<'a, T>(
    condvar: &std::sync::Condvar,
    guard: std::sync::MutexGuard<'a, T>,
) -> std::sync::MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// Poison-tolerant `Condvar::wait_timeout` (see [`lock`]); the guard alone.
pub(crate) fn wait_timeout<'a, T>(
    condvar: &std::sync::Condvar,
    guard: std::sync::MutexGuard<'a, T>,
    timeout: std::time::Duration,
) -> std::sync::MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(|p| p.into_inner())
        .0
}

/// Polls of a worker's queue before the worker sleeps on it (`poll_then_recv`).
const IDLE_POLLS: u32 = 64;

/// The next message of `queue` (`None`: every sender is gone), polled `IDLE_POLLS` times
/// (yielding the CPU between polls) before blocking: a sender that finds the receiving
/// thread asleep pays a futex wake inside its own call, a good part of a small call's
/// cost when calls come a few microseconds apart.
pub(crate) fn poll_then_recv<T>(queue: &std::sync::mpsc::Receiver<T>) -> Option<T> {
    for _ in 0..IDLE_POLLS {
        match queue.try_recv() {
            Ok(message) => return Some(message),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    queue.recv().ok()
}
