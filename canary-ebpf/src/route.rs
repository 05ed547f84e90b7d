//! `sk_lookup`: a new connection to an `http` service's address (a key the XDP program
//! never matches, see `PROTO_HTTP`) is handed to the agent's listener for the service,
//! which reads the request head and splices the connection (splice.rs).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::programs::SkLookupContext;
use canary_common::{ServiceKey, FAMILY_V4, FAMILY_V6, PROTO_HTTP, PROTO_TCP};

use crate::maps::{ROUTE_LISTENERS, SERVICES};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
pub fn handle(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    // Context fields are read one by one (volatile), as the verifier wants: each
    // load straight from the context pointer plus the field's offset.
    // SAFETY: the context pointer is valid for the program run.
    let field = |p: *const u32| unsafe { read_volatile(p) };
    if field(unsafe { addr_of!((*l).protocol) }) != PROTO_TCP as u32 {
        return;
    }
    let (family, addr) = match field(unsafe { addr_of!((*l).family) }) {
        AF_INET => (
            FAMILY_V4,
            [field(unsafe { addr_of!((*l).local_ip4) }), 0, 0, 0],
        ),
        AF_INET6 => (
            FAMILY_V6,
            [
                field(unsafe { addr_of!((*l).local_ip6[0]) }),
                field(unsafe { addr_of!((*l).local_ip6[1]) }),
                field(unsafe { addr_of!((*l).local_ip6[2]) }),
                field(unsafe { addr_of!((*l).local_ip6[3]) }),
            ],
        ),
        _ => return,
    };
    let port = field(unsafe { addr_of!((*l).local_port) });
    let key = ServiceKey {
        addr,
        port: (port as u16).to_be(),
        proto: PROTO_HTTP,
        family,
    };
    // SAFETY: map values are read-only here.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return;
    };
    // Listener slot: service id * 2, + 1 for IPv6.
    let slot = svc.id * 2 + (family == FAMILY_V6) as u32;
    // No listener (agent not running): the kernel's own lookup goes on, and the
    // connection is refused as before the service had rules.
    let _ = ROUTE_LISTENERS.redirect_sk_lookup(ctx, slot, 0);
}
