//! Bounds on every size a guest controls. A host call that would exceed one fails with
//! the status named at each constant; it never allocates without bound or panics.

/// Largest single byte string a host call copies out of guest memory (a header value, a
/// body chunk to set, a log message, a shared-data value): `BadArgument` above it.
/// Envoy has no such bound; guest memory itself is limited by [`MAX_MEMORY_BYTES`].
pub const MAX_GUEST_BYTES: usize = 64 * 1024 * 1024;

/// Largest serialised header map accepted from the guest, as in proxy-wasm-cpp-host
/// (`PROXY_WASM_HOST_PAIRS_MAX_BYTES`). A larger one reads as an empty map, as there.
pub const MAX_PAIRS_BYTES: usize = 1024 * 1024;

/// Most pairs in a serialised header map from the guest, as in proxy-wasm-cpp-host
/// (`PROXY_WASM_HOST_PAIRS_MAX_COUNT`). More read as an empty map, as there.
pub const MAX_PAIRS_COUNT: usize = 1024;

/// Default and largest linear memory of a VM (proxy-wasm-cpp-host's
/// `PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES`, 1 GiB). Tests may set a lower limit.
pub const MAX_MEMORY_BYTES: usize = 1024 * 1024 * 1024;

/// Largest `random_get` request (`PROXY_WASM_HOST_WASI_RANDOM_GET_MAX_SIZE_BYTES`);
/// above it WASI `EINVAL`, as in Envoy.
pub const MAX_RANDOM_BYTES: usize = 64 * 1024;

/// Most iovecs in one `fd_write` (POSIX `IOV_MAX`); above it WASI `EINVAL`.
pub const MAX_IOVECS: usize = 1024;

/// Most guest frames kept in a trap's backtrace (`PROXY_WASM_HOST_MAX_BACKTRACE_FRAMES_COUNT`).
pub const MAX_BACKTRACE_FRAMES: usize = 20;

/// Most items waiting in one shared queue; `enqueue` beyond it is `InternalFailure`.
/// Envoy's queues are unbounded: this only stops a runaway guest from exhausting the
/// test's memory.
pub const MAX_QUEUE_ITEMS: usize = 1 << 20;

/// Most bytes in one property path.
pub const MAX_PROPERTY_PATH_BYTES: usize = 64 * 1024;
