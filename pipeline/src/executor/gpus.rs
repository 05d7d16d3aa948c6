//! Which GPUs this machine offers to local worker slots, their names, and
//! the memory stage kinds check their models against when a pipeline is
//! read ([`gpu_memory`]).
//!
//! `CUDA_VISIBLE_DEVICES`, when set, is the list (its entries, ids or UUIDs,
//! become `cuda:ENTRY` slots and go back into each worker's
//! `CUDA_VISIBLE_DEVICES`); otherwise the CUDA driver counts the devices.
//! The driver library (`libcuda.so.1`) is opened at run time, so a build
//! without CUDA, on a machine without a driver, starts and finds none.
//! (cudarc's dynamic loading would do the same, but its build script refuses
//! to be both dynamically loaded here and dynamically linked by candle's
//! `cuda` feature in one build.)

use std::ffi::{CStr, c_char, c_int, c_void};

/// Slots for the local executor: `cuda:0`, `cuda:1`, ...
pub fn visible_gpus() -> Vec<String> {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => from_visible_devices(&list),
        Err(_) => (0..driver_device_count())
            .map(|i| format!("cuda:{i}"))
            .collect(),
    }
}

/// `CUDA_VISIBLE_DEVICES` as slots; CUDA stops at the first invalid entry
/// (`-1` hides every device).
fn from_visible_devices(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .take_while(|e| !e.is_empty() && !e.starts_with('-'))
        .map(|e| format!("cuda:{e}"))
        .collect()
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

/// The CUDA driver library, opened at run time (never closed: the driver
/// keeps state for the life of the process).
struct Driver(*mut c_void);

impl Driver {
    fn open() -> Option<Driver> {
        // SAFETY: a plain dlopen of a library name; null on failure.
        let handle =
            unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return None;
        }
        let d = Driver(handle);
        let init: CuInit = d.symbol(c"cuInit")?;
        // SAFETY: cuInit(0) is the documented first call of the driver API.
        (unsafe { init(0) } == 0).then_some(d)
    }

    /// A function of the driver; `F` must be its C signature.
    fn symbol<F: Copy>(&self, name: &CStr) -> Option<F> {
        // SAFETY: dlsym on a handle dlopen gave us; null when missing.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: the callers name functions whose C signatures F spells.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

/// How many devices the CUDA driver sees; 0 without a driver.
fn driver_device_count() -> usize {
    Driver::open().map_or(0, |d| d.device_count())
}

impl Driver {
    /// How many devices this driver sees (0 if it cannot say).
    fn device_count(&self) -> usize {
        let Some(count) = self.symbol::<CuDeviceGetCount>(c"cuDeviceGetCount") else {
            return 0;
        };
        let mut n: c_int = 0;
        // SAFETY: writes one int.
        if unsafe { count(&mut n) } != 0 {
            return 0;
        }
        n.max(0) as usize
    }
}

/// The name of device `ordinal` as this process sees it ("NVIDIA H200"),
/// if a driver answers.
pub fn gpu_name(ordinal: usize) -> Option<String> {
    let d = Driver::open()?;
    let get: CuDeviceGet = d.symbol(c"cuDeviceGet")?;
    let name: CuDeviceGetName = d.symbol(c"cuDeviceGetName")?;
    let mut dev: c_int = 0;
    // SAFETY: writes one int.
    if unsafe { get(&mut dev, ordinal as c_int) } != 0 {
        return None;
    }
    let mut buf = [0 as c_char; 256];
    // SAFETY: the driver writes at most buf.len() bytes, NUL-terminated.
    if unsafe { name(buf.as_mut_ptr(), buf.len() as c_int, dev) } != 0 {
        return None;
    }
    // SAFETY: NUL-terminated by the driver (and the buffer ends in zeros).
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// The variable that states the memory of the GPUs stages get, in GiB.
pub const GPU_MEMORY_VAR: &str = "HAIC_GPU_MEMORY_GIB";

/// The memory of one GPU a stage will get, in bytes, and where that figure
/// comes from: `HAIC_GPU_MEMORY_GIB` when set (a Slurm cluster's GPUs, which
/// the login node cannot see), else the smallest device the CUDA driver
/// sees here; `None` with neither (a machine without GPUs). An unreadable
/// variable is an error that says what to write.
pub fn gpu_memory() -> Result<Option<(u64, String)>, String> {
    if let Ok(v) = std::env::var(GPU_MEMORY_VAR) {
        return stated_memory(&v).map(Some);
    }
    static LOCAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    Ok(LOCAL
        .get_or_init(smallest_device_memory)
        .map(|bytes| (bytes, "the smallest GPU here".to_string())))
}

/// `HAIC_GPU_MEMORY_GIB`'s value in bytes, and the source named.
fn stated_memory(v: &str) -> Result<(u64, String), String> {
    match v.trim().parse::<f64>() {
        Ok(gib) if gib.is_finite() && gib > 0.0 => Ok((
            (gib * (1u64 << 30) as f64) as u64,
            format!("{GPU_MEMORY_VAR}={}", v.trim()),
        )),
        _ => Err(format!(
            "{GPU_MEMORY_VAR} is `{v}`: give the memory of one GPU in GiB, e.g. {GPU_MEMORY_VAR}=80"
        )),
    }
}

/// The smallest total memory of the devices the driver sees, if any.
fn smallest_device_memory() -> Option<u64> {
    let d = Driver::open()?;
    let get: CuDeviceGet = d.symbol(c"cuDeviceGet")?;
    let total: CuDeviceTotalMem = d.symbol(c"cuDeviceTotalMem_v2")?;
    (0..d.device_count())
        .filter_map(|ordinal| {
            let mut dev: c_int = 0;
            let mut bytes: usize = 0;
            // SAFETY: each call writes one int / one size_t.
            let ok = unsafe { get(&mut dev, ordinal as c_int) == 0 && total(&mut bytes, dev) == 0 };
            ok.then_some(bytes as u64)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_devices_become_slots_up_to_the_first_invalid_entry() {
        assert_eq!(from_visible_devices("0,2"), ["cuda:0", "cuda:2"]);
        assert_eq!(from_visible_devices(" 1 "), ["cuda:1"]);
        assert_eq!(from_visible_devices("GPU-8e1a"), ["cuda:GPU-8e1a"]);
        assert!(from_visible_devices("").is_empty());
        assert!(from_visible_devices("-1").is_empty());
        assert_eq!(from_visible_devices("3,-1,4"), ["cuda:3"]);
    }

    #[test]
    fn the_stated_gpu_memory_is_gib_or_an_error_that_says_so() {
        assert_eq!(
            stated_memory(" 80 ").unwrap(),
            (80 << 30, "HAIC_GPU_MEMORY_GIB=80".to_string())
        );
        assert_eq!(stated_memory("0.5").unwrap().0, 1 << 29);
        for bad in ["", "80G", "-1", "0", "inf", "NaN"] {
            let e = stated_memory(bad).unwrap_err();
            assert!(
                e.contains("in GiB, e.g. HAIC_GPU_MEMORY_GIB=80"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_machine_without_a_driver_has_no_gpus() {
        // This machine (and CI) has no libcuda: the lookup must say so
        // quietly, not fail. On a GPU machine it counts them.
        if Driver::open().is_none() {
            assert_eq!(driver_device_count(), 0);
            assert_eq!(gpu_name(0), None);
            assert_eq!(smallest_device_memory(), None);
        }
    }
}
