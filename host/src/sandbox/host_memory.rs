//! What the host holds on a run's behalf, bounded and counted.
//!
//! A guest makes the host allocate through its imports: resources in the
//! run's `ResourceTable` (wasi-http header maps, requests and their body
//! buffers, streams, pollables), component handles, the data wasmtime
//! copies out of guest memory for each host call, random bytes, bodies.
//! None of that is linear memory, so the store limiter never sees it. Left
//! alone, a 32 MiB agent held a gigabyte of the node's heap this way in
//! half a second. Two things keep it inside the run's budget:
//!
//! - [`HostLimits`]: a fixed ceiling on every count and size (entries,
//!   handles, bytes per header map, per body buffer, per host call, per
//!   random draw, per LLM answer), applied to each run's store.
//! - [`audit`]: before each `wasi:http` call, the run's resource table is
//!   walked and each entry charged what it can hold at most. The charge
//!   counts toward the run's memory budget ([`MemoryMeter`]); a run over it
//!   gets no more `wasi:http` calls (each one traps) and fails
//!   `budget.memory`. The walk is over live entries only, at most
//!   [`HostLimits::resource_entries`] of them, and the run pays for it in
//!   fuel ([`FUEL_PER_ENTRY`]), so that calling cheap `wasi:http`
//!   functions while holding many resources cannot buy host CPU beyond the
//!   fuel budget.
//!
//! What is charged is an upper bound, not a measurement: a header map is
//! charged the most it may hold, whatever it holds now. The node cannot
//! see inside wasi-http's types cheaply, and over-charging only ever
//! stops the run that holds the resources. The bound holds because the
//! node also bounds what it cannot charge precisely at its source: a
//! response's headers are copied out of hyper's read buffer (so a kept
//! header map pins no connection buffer) and refused past `field_bytes`
//! (`capabilities/http/outgoing.rs`).

use std::any::Any;

use wasmtime::component::ResourceTable;
use wasmtime_wasi_http::FieldMap;
use wasmtime_wasi_http::p2::body::{HostFutureTrailers, HostIncomingBody};
use wasmtime_wasi_http::p2::types::{
    HostFutureIncomingResponse, HostIncomingResponse, HostOutgoingRequest, HostOutgoingResponse,
};

use super::meters::MemoryMeter;

/// The ceilings every run gets. Each is small next to any memory budget,
/// and together they make the host's share of a run a known quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Host resources a run may hold at once (`ResourceTable` entries).
    pub resource_entries: usize,
    /// Component-model handles a run may hold at once (its own resources
    /// and the host's, in the component's handle tables).
    pub component_handles: usize,
    /// The most a `wasi:http` `fields` may hold (wasi-http's own
    /// accounting: names, values and their bookkeeping).
    pub field_bytes: usize,
    /// The size of one chunk of an outgoing request body, and how many
    /// the host buffers before the guest must wait for the connection.
    pub body_chunk_bytes: usize,
    pub body_buffer_chunks: usize,
    /// The most one host call may carry from the guest (strings, lists),
    /// and the run's result when it returns.
    pub hostcall_bytes: usize,
    /// The largest `get-random-bytes` draw.
    pub random_bytes: u64,
    /// Outbound HTTP requests a run may have in flight at once.
    pub http_in_flight: u32,
}

impl HostLimits {
    /// The ceilings for a node whose result cap is `result_bytes`: a
    /// run's result is lifted under the same per-call ceiling, so that
    /// ceiling leaves room for the largest result the node accepts.
    pub fn for_results(result_bytes: usize) -> HostLimits {
        HostLimits {
            hostcall_bytes: result_bytes.saturating_mul(2).max(HOSTCALL_BYTES),
            ..HostLimits::default()
        }
    }

    /// The most one outgoing body buffers in the host: its chunks, and
    /// the one being handed over.
    pub fn body_buffer_bytes(&self) -> u64 {
        (self.body_buffer_chunks as u64 + 1) * self.body_chunk_bytes as u64
    }
}

/// 2 MiB: a large prompt, a log line, a result map of the default cap
/// with its bookkeeping.
const HOSTCALL_BYTES: usize = 2 << 20;

/// Fuel a run pays for each resource-table entry the audit walks: about
/// what the host spends on it, at roughly one unit of fuel per
/// WebAssembly instruction.
pub const FUEL_PER_ENTRY: u64 = 100;

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            resource_entries: 4096,
            component_handles: 10_000,
            // wasi-http's default is 128 KiB, sized for a proxy; the
            // headers an agent sends and receives are a few KiB on the wire
            // (proxies commonly refuse more than 8 KiB).
            field_bytes: 32 << 10,
            body_chunk_bytes: 64 << 10,
            body_buffer_chunks: 1,
            hostcall_bytes: HOSTCALL_BYTES,
            random_bytes: 1 << 20,
            http_in_flight: 16,
        }
    }
}

/// What any entry costs the host besides its payload: the table slot, the
/// box, wasmtime's bookkeeping, the small resources (pollables, streams,
/// errors) whole.
pub const ENTRY_BYTES: u64 = 512;

/// What an HTTP connection holds while a response is on its way or being
/// read: hyper's read buffer at its largest (8 KiB plus 4 KiB for each of
/// 100 headers), the write buffer, TLS state. A body's frames and any
/// trailers are slices of that buffer.
pub const CONNECTION_BYTES: u64 = 512 << 10;

/// What a header map costs the host at most: twice the accounting
/// wasi-http limits (`field_bytes`), for the `HeaderMap`'s own tables and
/// allocation slack, which its accounting leaves out.
pub fn field_charge(limits: &HostLimits) -> u64 {
    2 * limits.field_bytes as u64
}

/// Charges the run for what its resource table holds, as
/// [`MemoryMeter::set_host_bytes`] does, and returns how many entries it
/// walked (the work the run caused, paid in fuel). Sets the meter's
/// refusal when the run is now over its memory budget.
pub fn audit(table: &mut ResourceTable, limits: &HostLimits, meter: &mut MemoryMeter) -> (bool, u64) {
    let (bytes, entries) = charge(table, limits);
    (meter.set_host_bytes(bytes), entries)
}

/// The bytes the run's resource table can make the host hold, and how
/// many entries it holds. Every `wasi:http` type that can own headers, a
/// body buffer or a connection is charged its ceiling; anything else its
/// entry.
pub fn charge(table: &mut ResourceTable, limits: &HostLimits) -> (u64, u64) {
    let fields = field_charge(limits);
    let body_buffer = limits.body_buffer_bytes();
    let mut entries = 0;
    let bytes = table
        .iter_mut()
        .map(|entry| {
            entries += 1;
            let entry: &(dyn Any + Send) = entry;
            let payload = if entry.is::<FieldMap>() {
                fields
            } else if let Some(request) = entry.downcast_ref::<HostOutgoingRequest>() {
                let text = request.authority.as_ref().map_or(0, String::len)
                    + request.path_with_query.as_ref().map_or(0, String::len);
                fields + text as u64 + if request.body.is_some() { body_buffer } else { 0 }
            } else if let Some(response) = entry.downcast_ref::<HostOutgoingResponse>() {
                fields + if response.body.is_some() { body_buffer } else { 0 }
            } else if let Some(future) = entry.downcast_ref::<HostFutureIncomingResponse>() {
                match future {
                    HostFutureIncomingResponse::Consumed => 0,
                    _ => CONNECTION_BYTES,
                }
            } else if let Some(response) = entry.downcast_ref::<HostIncomingResponse>() {
                fields + if response.body.is_some() { CONNECTION_BYTES } else { 0 }
            } else if entry.is::<HostIncomingBody>() || entry.is::<HostFutureTrailers>() {
                CONNECTION_BYTES
            } else {
                0
            };
            ENTRY_BYTES + payload
        })
        .sum();
    (bytes, entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::meters::{InstanceShape, Refusal};

    const SHAPE: InstanceShape = InstanceShape {
        core_instances: 1,
        tables: 1,
        memories: 1,
    };

    #[test]
    fn header_maps_are_charged_their_ceiling_and_the_run_stopped_at_its_budget() {
        let limits = HostLimits::default();
        let mut table = ResourceTable::new();
        let per_map = ENTRY_BYTES + field_charge(&limits);
        let mut meter = MemoryMeter::new(3 * per_map, 100, SHAPE);
        for _ in 0..3 {
            table.push(FieldMap::new_mutable(limits.field_bytes)).unwrap();
            assert!(audit(&mut table, &limits, &mut meter).0);
        }
        let fourth = table.push(FieldMap::new_mutable(limits.field_bytes)).unwrap();
        assert_eq!(audit(&mut table, &limits, &mut meter), (false, 4));
        assert!(matches!(meter.refusal(), Some(Refusal::Host { host_bytes, .. }) if *host_bytes == 4 * per_map));
        table.delete(fourth).unwrap();
        assert_eq!(
            charge(&mut table, &limits),
            (3 * per_map, 3),
            "a dropped map is no longer charged"
        );
        assert_eq!(meter.peak_host_bytes(), 4 * per_map);
    }

    #[test]
    fn other_resources_cost_their_entry() {
        let mut table = ResourceTable::new();
        table.push(42u32).unwrap();
        assert_eq!(charge(&mut table, &HostLimits::default()), (ENTRY_BYTES, 1));
    }

    #[test]
    fn the_per_call_ceiling_leaves_room_for_the_largest_result() {
        assert_eq!(HostLimits::for_results(1 << 20).hostcall_bytes, HOSTCALL_BYTES);
        assert_eq!(HostLimits::for_results(2 << 20).hostcall_bytes, 4 << 20);
        assert_eq!(HostLimits::for_results(16 << 20).hostcall_bytes, 32 << 20);
    }
}
