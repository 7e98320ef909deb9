//! Context control: `proxy_set_effective_context` and `proxy_done`.

use super::{code, AbiView, HostResult};
use wasmtime::{Caller, Linker};

/// The host side of context control.
pub trait ContextHost {
    /// Makes `context_id` the context later host calls act on (`BadArgument` if it does
    /// not exist).
    fn set_effective_context(&mut self, context_id: u32) -> HostResult<()>;
    /// A root context that returned false from `on_done` has finished (`NotFound` if none
    /// was pending).
    fn done(&mut self) -> HostResult<()>;
}

/// Links the context host calls.
pub fn add_to_linker<T: AbiView + ContextHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, T>, id: i32| -> i32 {
            code(c.data_mut().set_effective_context(id as u32))
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: Caller<'_, T>| -> i32 {
        code(c.data_mut().done())
    })?;
    Ok(())
}
