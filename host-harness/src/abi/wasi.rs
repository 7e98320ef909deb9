//! The WASI preview-1 calls the SDKs use, as Envoy provides them (proxy-wasm-cpp-host
//! `exports.cc`): `fd_write` to stdout/stderr goes to the log (info and error, one
//! trailing newline removed), clocks read the host's clock, `random_get` fills from the
//! host, environ and args come from the host, `proc_exit` ends the guest. File system,
//! sockets and polling answer as Envoy does (mostly `ENOSYS`/`EBADF`). Linked under both
//! `wasi_snapshot_preview1` and `wasi_unstable`.

use super::clock::ClockHost;
use super::limits::{MAX_GUEST_BYTES, MAX_IOVECS, MAX_RANDOM_BYTES};
use super::logging::LoggingHost;
use super::{memory, AbiView, LogLevel};
use wasmtime::{Caller, Linker};

const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOENT: i32 = 44;
const ENOSYS: i32 = 52;
const ENOTSUP: i32 = 58;

/// The host side of WASI beyond logging and clocks.
pub trait WasiHost: LoggingHost + ClockHost {
    /// Fills `buf` with random bytes.
    fn random_bytes(&mut self, buf: &mut [u8]);
    /// Environment variables (`KEY`, `value`).
    fn environ(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The guest called `proc_exit`: returned as the trap's error.
#[derive(Debug, thiserror::Error)]
#[error("guest called proc_exit({0})")]
pub struct ProcExit(pub i32);

fn fd_write<T: AbiView + WasiHost>(
    c: &mut Caller<'_, T>,
    fd: i32,
    iovs: i32,
    n: i32,
) -> Result<usize, i32> {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Err(EBADF),
    };
    let n = n as u32 as usize;
    if n > MAX_IOVECS {
        return Err(EINVAL);
    }
    let mut s = Vec::new();
    for i in 0..n {
        let at = (iovs as u32 as usize + i * 8) as u32 as i32;
        let iov = memory::read(c, at, 8, 8).map_err(|_| EFAULT)?;
        let buf = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        if len != 0 {
            if s.len() + len as u32 as usize > MAX_GUEST_BYTES {
                return Err(EINVAL);
            }
            s.extend(memory::read(c, buf, len, MAX_GUEST_BYTES).map_err(|_| EFAULT)?);
        }
    }
    let written = s.len();
    if written != 0 {
        if s.last() == Some(&b'\n') {
            s.pop();
        }
        let msg = String::from_utf8_lossy(&s).into_owned();
        c.data_mut().log(level, &msg).map_err(|_| EBADF)?;
    }
    Ok(written)
}

fn link<T: AbiView + WasiHost>(linker: &mut Linker<T>, m: &str) -> wasmtime::Result<()> {
    linker.func_wrap(
        m,
        "fd_write",
        |mut c: Caller<'_, T>, fd: i32, iovs: i32, n: i32, nw: i32| -> i32 {
            match fd_write(&mut c, fd, iovs, n) {
                Ok(w) => match memory::write_u32(&mut c, nw, w as u32) {
                    Ok(()) => ESUCCESS,
                    Err(_) => EFAULT,
                },
                Err(e) => e,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "fd_read",
        |_: Caller<'_, T>, _: i32, _: i32, _: i32, _: i32| ENOSYS,
    )?;
    linker.func_wrap(
        m,
        "fd_seek",
        |_: Caller<'_, T>, _: i32, _: i64, _: i32, _: i32| ESUCCESS,
    )?;
    linker.func_wrap(m, "fd_close", |_: Caller<'_, T>, _: i32| ESUCCESS)?;
    linker.func_wrap(m, "fd_prestat_get", |_: Caller<'_, T>, _: i32, _: i32| {
        EBADF
    })?;
    linker.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_: Caller<'_, T>, _: i32, _: i32, _: i32| ENOSYS,
    )?;
    linker.func_wrap(m, "fd_filestat_get", |_: Caller<'_, T>, _: i32, _: i32| {
        EBADF
    })?;
    linker.func_wrap(
        m,
        "fd_fdstat_set_flags",
        |_: Caller<'_, T>, _: i32, _: i32| ENOSYS,
    )?;
    linker.func_wrap(
        m,
        "fd_fdstat_get",
        |mut c: Caller<'_, T>, fd: i32, out: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            // filetype, flags, then rights_base = FD_WRITE (64), rights_inheriting = 0.
            let mut stat = [0u8; 24];
            stat[8] = 64;
            match memory::write(&mut c, out, &stat) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "path_open",
        |_: Caller<'_, T>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i64,
         _: i64,
         _: i32,
         _: i32| ENOENT,
    )?;
    linker.func_wrap(
        m,
        "path_filestat_get",
        |_: Caller<'_, T>, _: i32, _: i32, _: i32, _: i32, _: i32| ENOTSUP,
    )?;
    linker.func_wrap(
        m,
        "poll_oneoff",
        |mut c: Caller<'_, T>, _: i32, _: i32, _: i32, nev: i32| -> i32 {
            match memory::write_u32(&mut c, nev, 0) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(m, "sched_yield", |_: Caller<'_, T>| ESUCCESS)?;
    linker.func_wrap(m, "args_get", |_: Caller<'_, T>, _: i32, _: i32| ESUCCESS)?;
    linker.func_wrap(
        m,
        "args_sizes_get",
        |mut c: Caller<'_, T>, argc: i32, size: i32| -> i32 {
            match memory::write_u32(&mut c, argc, 0)
                .and_then(|_| memory::write_u32(&mut c, size, 0))
            {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "environ_sizes_get",
        |mut c: Caller<'_, T>, count: i32, size: i32| -> i32 {
            let env = c.data().environ();
            let total: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            match memory::write_u32(&mut c, count, env.len() as u32)
                .and_then(|_| memory::write_u32(&mut c, size, total as u32))
            {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "environ_get",
        |mut c: Caller<'_, T>, array: i32, buf: i32| -> i32 {
            let env = c.data().environ();
            let (mut array, mut buf) = (array as u32, buf as u32);
            for (k, v) in env {
                let entry = format!("{k}={v}\0");
                if memory::write_u32(&mut c, array as i32, buf).is_err()
                    || memory::write(&mut c, buf as i32, entry.as_bytes()).is_err()
                {
                    return EFAULT;
                }
                buf = buf.wrapping_add(entry.len() as u32);
                array = array.wrapping_add(4);
            }
            ESUCCESS
        },
    )?;
    linker.func_wrap(
        m,
        "clock_time_get",
        |mut c: Caller<'_, T>, id: i32, _prec: i64, out: i32| -> i32 {
            let t = match id {
                0 => c.data_mut().now_nanos(),
                1 => c.data_mut().monotonic_nanos(),
                _ => return ENOTSUP,
            };
            match memory::write_u64(&mut c, out, t) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "clock_res_get",
        |mut c: Caller<'_, T>, id: i32, out: i32| -> i32 {
            if id != 0 && id != 1 {
                return ENOTSUP;
            }
            match memory::write_u64(&mut c, out, 1) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "random_get",
        |mut c: Caller<'_, T>, ptr: i32, len: i32| -> i32 {
            let len = len as u32 as usize;
            if len > MAX_RANDOM_BYTES {
                return EINVAL;
            }
            if len == 0 {
                return ESUCCESS;
            }
            let mut buf = vec![0u8; len];
            c.data_mut().random_bytes(&mut buf);
            match memory::write(&mut c, ptr, &buf) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "proc_exit",
        |_: Caller<'_, T>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    Ok(())
}

/// Links the WASI calls under `wasi_snapshot_preview1` and `wasi_unstable`.
pub fn add_to_linker<T: AbiView + WasiHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    link(linker, "wasi_snapshot_preview1")?;
    link(linker, "wasi_unstable")
}
