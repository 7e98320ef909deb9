//! Time: `proxy_get_current_time_nanoseconds` and `proxy_set_tick_period_milliseconds`.
//! WASI's `clock_time_get` reads the same clock (see [`super::wasi`]).

use super::{code, memory, AbiView, HostResult};
use std::time::Duration;
use wasmtime::{Caller, Linker};

/// The host side of time.
pub trait ClockHost {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    fn now_nanos(&mut self) -> u64;
    /// Monotonic time in nanoseconds (WASI clock 1).
    fn monotonic_nanos(&mut self) -> u64;
    /// Sets the calling root context's tick period (zero stops the ticks).
    fn set_tick_period(&mut self, period: Duration) -> HostResult<()>;
}

/// Links the time host calls.
pub fn add_to_linker<T: AbiView + ClockHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, T>, ptr: i32| -> i32 {
            let now = c.data_mut().now_nanos();
            code(memory::write_u64(&mut c, ptr, now))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, T>, ms: i32| -> i32 {
            code(
                c.data_mut()
                    .set_tick_period(Duration::from_millis(u64::from(ms as u32))),
            )
        },
    )?;
    Ok(())
}
