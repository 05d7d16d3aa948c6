//! Process-wide settings that CPU training on few cores needs: of mimalloc
//! (the global allocator of every haic-pipe binary) and of candle's thread
//! pool for element-wise ops. Each yields to the user's own environment
//! variable when that is set.
//!
//! - mimalloc hands freed pages back to the OS a second after they empty.
//!   Training frees and reallocates megabyte-sized tensors all the time, so
//!   it kept faulting pages back in, each one zeroed by the kernel
//!   (`perf stat -e page-faults` on `compare-bench --steps 20 --only vq`:
//!   5,500-10,200 faults with the default, 280-300 without purging). A
//!   worker process lives for one stage, so keeping its freed pages costs at
//!   most its peak memory, which it reaches anyway.
//! - After each element-wise op, candle's pool threads spin 25,000 times
//!   before they sleep. On 2 cores that spinning thread takes a core from
//!   the convolution kernels that run next (the same benchmark, 5 runs
//!   alternating: median 116 ms a step and 5.0 s of CPU with the default,
//!   102 ms and 4.4 s with 100 spins).

/// `mi_option_purge_delay` in `mi_option_e` of the mimalloc v3 header that
/// libmimalloc-sys 0.1.49 builds (the workspace pins that version).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's own variable for that option.
const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";
/// candle's variable for its pool's spin limit, read once when the pool
/// starts (at the first element-wise op).
const SPIN_LIMIT_ENV: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT: &str = "100";

/// Applies both settings. Call first thing in `main`, before any other
/// thread starts.
pub fn apply() {
    if std::env::var_os(PURGE_DELAY_ENV).is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if std::env::var_os(SPIN_LIMIT_ENV).is_none() {
        // SAFETY: called at the start of `main`, while this is the only
        // thread, so nothing reads the environment concurrently.
        unsafe { std::env::set_var(SPIN_LIMIT_ENV, SPIN_LIMIT) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the option's number: the purge delay defaults to 1000 ms in
    /// this mimalloc, and neither neighbouring option defaults to 1000.
    #[test]
    fn the_option_number_is_the_purge_delay() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        assert_ne!(get(MI_OPTION_PURGE_DELAY - 1), 1000);
        assert_ne!(get(MI_OPTION_PURGE_DELAY + 1), 1000);
        // SAFETY: sets one integer option, as apply() does.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        assert_eq!(get(MI_OPTION_PURGE_DELAY), -1);
    }
}
