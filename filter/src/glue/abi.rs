//! The host calls the filter makes while it handles traffic, as bytes and without panics.
//!
//! The SDK's accessors decode header maps with `String::from_utf8(..).unwrap()` and panic on
//! any status they do not expect, so one obs-text byte (RFC 9110 §5.5) or a stream that went
//! away kills the VM. These wrappers call the same ABI functions, check every length and
//! status, and return what the host gave or an error. `clippy.toml` forbids the SDK's own
//! accessors in this crate, so the glue cannot reach them by mistake.

use crate::field::{self, Field, OwnedFields};
use std::ptr::null_mut;

/// A Proxy-Wasm status other than OK, as the host returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

impl HostError {
    /// The host's `CasMismatch`.
    pub const CAS_MISMATCH: HostError = HostError(8);
}

/// A header map of the ABI.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Map {
    /// The client's request headers.
    Request = 0,
    /// The upstream's response headers.
    Response = 2,
    /// The headers of the answer to the filter's own HTTP call.
    CallResponse = 6,
}

/// A buffer of the ABI.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    /// The upstream's response body.
    ResponseBody = 1,
    /// The answer to the filter's own HTTP call.
    CallResponseBody = 4,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
}

fn check(status: u32) -> Result<(), HostError> {
    match status {
        0 => Ok(()),
        s => Err(HostError(s)),
    }
}

/// Takes ownership of bytes the host wrote into memory it got from the SDK's allocator
/// (`proxy_on_memory_allocate`, which hands out exactly `size` bytes).
///
/// # Safety
/// `data` is null or came from that allocator with `size` bytes.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Calls a host function that returns one buffer, and takes the buffer.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Vec<u8>, HostError> {
    let mut data = null_mut();
    let mut size = 0;
    let status = call(&mut data, &mut size);
    // Taken even on error, so that nothing the host allocated leaks.
    let bytes = unsafe { take(data, size) };
    check(status).map(|()| bytes)
}

/// Every field of a header map, names and values as bytes. A map the host cannot give
/// (a stream already gone) is empty.
pub fn header_map(map: Map) -> OwnedFields {
    returned(|d, s| unsafe { proxy_get_header_map_pairs(map as u32, d, s) })
        .ok()
        .and_then(|b| field::decode_pairs(&b))
        .unwrap_or_default()
}

/// The value of one header, as bytes.
pub fn header(map: Map, name: &str) -> Option<Vec<u8>> {
    returned(|d, s| unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), d, s)
    })
    .ok()
}

/// Sets (replaces or adds) one header.
pub fn set_header(map: Map, name: &str, value: &[u8]) -> Result<(), HostError> {
    check(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of one header.
pub fn remove_header(map: Map, name: &str) -> Result<(), HostError> {
    check(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// Up to `max` bytes of a buffer from `start`.
pub fn buffer(buffer: Buffer, start: usize, max: usize) -> Option<Vec<u8>> {
    returned(|d, s| unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, d, s) }).ok()
}

/// Answers the current stream with a local reply. Header values are bytes: a stored
/// response is served byte for byte.
pub fn send_response<F: Field>(status: u32, headers: &[F], body: &[u8]) -> Result<(), HostError> {
    let map = field::encode_pairs(headers);
    check(unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// A host property (a path of NUL-separated names).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut p = Vec::new();
    for part in path {
        p.extend_from_slice(part.as_bytes());
        p.push(0);
    }
    returned(|d, s| unsafe { proxy_get_property(p.as_ptr(), p.len(), d, s) }).ok()
}

/// A shared-data value and its CAS token; `None` when the key does not exist.
pub fn shared_get(key: &str) -> Option<(Vec<u8>, u32)> {
    let mut cas = 0;
    let v =
        returned(|d, s| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), d, s, &mut cas) })
            .ok()?;
    Some((v, cas))
}

/// Writes a shared-data value; `cas` 0 writes unconditionally.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Metric kinds of the ABI.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum MetricKind {
    /// Only goes up.
    Counter = 0,
    /// Set to a value.
    Gauge = 1,
    /// Records samples.
    Histogram = 2,
}

/// Defines a metric; `None` when the host refuses.
pub fn define_metric(kind: MetricKind, name: &str) -> Option<u32> {
    let mut id = 0;
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) }).ok()?;
    Some(id)
}

/// Adds to a counter.
pub fn increment_metric(id: u32, by: i64) {
    // A refused update loses one sample; nothing to do about it on the request path.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

/// Sets a gauge or records a histogram sample.
pub fn record_metric(id: u32, value: u64) {
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// The host's wall clock in Unix nanoseconds (0 if it will not say).
pub fn now_ns() -> u64 {
    let mut t = 0;
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        0 => t,
        _ => 0,
    }
}

/// Sets the root context's tick period.
pub fn set_tick_period_ms(ms: u64) {
    let _ = unsafe { proxy_set_tick_period_milliseconds(u32::try_from(ms).unwrap_or(u32::MAX)) };
}

/// Makes later host calls act on the stream `id`; fails when it is gone.
pub fn set_effective_context(id: u32) -> Result<(), HostError> {
    check(unsafe { proxy_set_effective_context(id) })
}

/// Resumes the effective stream's paused request.
pub fn resume_request() -> Result<(), HostError> {
    check(unsafe { proxy_continue_stream(0) })
}
