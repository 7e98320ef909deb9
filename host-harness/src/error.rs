//! Typed errors: loading, linking and instantiating a module, and guest traps.

use crate::abi::limits::MAX_BACKTRACE_FRAMES;
use crate::abi::wasi::ProcExit;
use std::fmt;

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum TrapKind {
    /// `unreachable` (a Rust panic with `panic = "abort"` ends here).
    Unreachable,
    /// A load or store outside linear memory.
    OutOfBounds,
    /// Integer division by zero or overflow.
    Arithmetic,
    /// An indirect call through a bad table entry or signature.
    BadCall,
    /// The call stack overflowed.
    StackOverflow,
    /// The fuel budget of the call ran out.
    FuelExhausted,
    /// The wall-clock budget of the call ran out (epoch interruption).
    Timeout,
    /// The guest called WASI `proc_exit` with this code.
    Exit(i32),
    /// Anything else (the message says what).
    Other,
}

/// One frame of a guest backtrace, innermost first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Function index in the module.
    pub func_index: u32,
    /// Function name from the name section, demangled, if any.
    pub func_name: Option<String>,
}

/// A guest trap, with where it happened.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Trap {
    /// The guest export that was running, e.g. `proxy_on_request_headers`.
    pub callback: String,
    /// The context it ran for.
    pub context_id: u32,
    /// What kind of trap.
    pub kind: TrapKind,
    /// The runtime's message.
    pub message: String,
    /// Guest frames, innermost first (at most [`MAX_BACKTRACE_FRAMES`]).
    pub backtrace: Vec<Frame>,
}

impl Trap {
    pub(crate) fn from_error(callback: &str, context_id: u32, err: &wasmtime::Error) -> Trap {
        let kind = if let Some(exit) = err.downcast_ref::<ProcExit>() {
            TrapKind::Exit(exit.0)
        } else {
            match err.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::UnreachableCodeReached) => TrapKind::Unreachable,
                Some(wasmtime::Trap::MemoryOutOfBounds)
                | Some(wasmtime::Trap::TableOutOfBounds) => TrapKind::OutOfBounds,
                Some(wasmtime::Trap::IntegerDivisionByZero)
                | Some(wasmtime::Trap::IntegerOverflow)
                | Some(wasmtime::Trap::BadConversionToInteger) => TrapKind::Arithmetic,
                Some(wasmtime::Trap::IndirectCallToNull) | Some(wasmtime::Trap::BadSignature) => {
                    TrapKind::BadCall
                }
                Some(wasmtime::Trap::StackOverflow) => TrapKind::StackOverflow,
                Some(wasmtime::Trap::OutOfFuel) => TrapKind::FuelExhausted,
                Some(wasmtime::Trap::Interrupt) => TrapKind::Timeout,
                _ => TrapKind::Other,
            }
        };
        let backtrace = err
            .downcast_ref::<wasmtime::WasmBacktrace>()
            .map(|bt| {
                bt.frames()
                    .iter()
                    .take(MAX_BACKTRACE_FRAMES)
                    .map(|f| Frame {
                        func_index: f.func_index(),
                        func_name: f.func_name().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let message = match err.downcast_ref::<wasmtime::Trap>() {
            Some(t) => t.to_string(),
            None => format!("{err:#}"),
        };
        Trap {
            callback: callback.to_string(),
            context_id,
            kind,
            message,
            backtrace,
        }
    }
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest trapped in {} (context {}): {}",
            self.callback, self.context_id, self.message
        )?;
        for (i, fr) in self.backtrace.iter().enumerate() {
            write!(
                f,
                "\n  {i}: #{} {}",
                fr.func_index,
                fr.func_name.as_deref().unwrap_or("<unnamed>")
            )?;
        }
        Ok(())
    }
}

/// Everything that can go wrong running a module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The module file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not a valid Wasm module (or Wasmtime refused to compile them).
    #[error("invalid wasm module: {0:#}")]
    Compile(wasmtime::Error),
    /// The engine could not be configured.
    #[error("engine configuration: {0:#}")]
    Engine(wasmtime::Error),
    /// The module exports no `proxy_abi_version_*` function this host knows.
    #[error("unknown Proxy-Wasm ABI: the module exports none of proxy_abi_version_0_1_0, _0_2_0, _0_2_1")]
    UnknownAbi,
    /// A required export is missing.
    #[error("module lacks the export `{0}`")]
    MissingExport(&'static str),
    /// An export has the wrong type.
    #[error("export `{name}` has the wrong type: {message}")]
    BadExport {
        /// The export.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Instantiation failed (an import this host does not provide, a memory over the limit).
    #[error("instantiating the module: {0:#}")]
    Instantiate(wasmtime::Error),
    /// The guest trapped.
    #[error("{0}")]
    Trap(Box<Trap>),
    /// `proxy_on_vm_start` returned false.
    #[error("proxy_on_vm_start returned false")]
    VmStartFailed,
    /// `proxy_on_configure` returned false (Envoy refuses the filter).
    #[error("proxy_on_configure returned false")]
    ConfigureFailed,
    /// The VM failed earlier (a trap) and cannot run callbacks any more.
    #[error("the VM failed earlier: {0}")]
    VmFailed(Box<Trap>),
    /// The stream does not exist or has finished.
    #[error("no such stream: {0}")]
    NoSuchStream(u32),
    /// The driver was asked for something out of order.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The trap, if this error is one.
    pub fn trap(&self) -> Option<&Trap> {
        match self {
            Error::Trap(t) | Error::VmFailed(t) => Some(t),
            _ => None,
        }
    }
}
