//! Logging: `proxy_log` and (ABI 0.2.1) `proxy_get_log_level`.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, AbiVersion, AbiView, HostResult, LogLevel, Status};
use wasmtime::{Caller, Linker};

/// The host side of logging.
pub trait LoggingHost {
    /// Logs `message` at `level` (the embedder decides what the level lets through).
    fn log(&mut self, level: LogLevel, message: &str) -> HostResult<()>;
    /// The host's current log level.
    fn log_level(&mut self) -> HostResult<LogLevel>;
}

/// Links `proxy_log`, and `proxy_get_log_level` for ABI 0.2.1.
pub fn add_to_linker<T: AbiView + LoggingHost>(
    linker: &mut Linker<T>,
    version: AbiVersion,
) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, T>, level: i32, ptr: i32, len: i32| -> i32 {
            let r = (|| {
                let level = LogLevel::from_raw(level as u32).ok_or(Status::BadArgument)?;
                let msg = memory::read_string(&mut c, ptr, len, MAX_GUEST_BYTES)?;
                c.data_mut().log(level, &msg)
            })();
            code(r)
        },
    )?;
    if version == AbiVersion::V0_2_1 {
        linker.func_wrap(
            "env",
            "proxy_get_log_level",
            |mut c: Caller<'_, T>, ptr: i32| -> i32 {
                let r = c
                    .data_mut()
                    .log_level()
                    .and_then(|l| memory::write_u32(&mut c, ptr, l as u32));
                code(r)
            },
        )?;
    }
    Ok(())
}
