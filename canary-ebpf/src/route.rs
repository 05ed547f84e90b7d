//! `sk_lookup`: a new connection to an `http` service's address (a key the XDP program
//! never matches, see `PROTO_HTTP`) is handed to the agent's listener for the service,
//! which reads the request head and splices the connection (splice.rs). Any other TCP
//! or UDP lookup to an address the agent made local for its router (ROUTE_ADDRS) is
//! refused: the `local` route would otherwise let every host daemon bound to 0.0.0.0
//! answer there.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    programs::SkLookupContext,
};
use canary_common::{RouteAddr, ServiceKey, FAMILY_V4, FAMILY_V6, PROTO_HTTP, PROTO_TCP};

use crate::maps::{ROUTE_ADDRS, ROUTE_LISTENERS, SERVICES};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// SK_PASS with the router's listener selected, SK_PASS with nothing selected (not a
/// routed address: the kernel's own lookup goes on), or SK_DROP (a routed address:
/// the kernel answers as for a closed port, RST for TCP and ICMP port unreachable for
/// UDP).
#[inline(always)]
pub fn handle(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Context fields are read one by one (volatile), as the verifier wants: each
    // load straight from the context pointer plus the field's offset.
    // SAFETY: the context pointer is valid for the program run.
    let field = |p: *const u32| unsafe { read_volatile(p) };
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
        _ => return SK_PASS,
    };
    if field(unsafe { addr_of!((*l).protocol) }) == PROTO_TCP as u32 {
        let port = field(unsafe { addr_of!((*l).local_port) });
        let key = ServiceKey {
            addr,
            port: (port as u16).to_be(),
            proto: PROTO_HTTP,
            family,
        };
        // SAFETY: map values are read-only here.
        if let Some(svc) = unsafe { SERVICES.get(&key) } {
            // Listener slot: service id * 2, + 1 for IPv6.
            let slot = svc.id * 2 + (family == FAMILY_V6) as u32;
            // No listener (agent not running): refused below, as a closed port.
            if ROUTE_LISTENERS.redirect_sk_lookup(ctx, slot, 0).is_ok() {
                return SK_PASS;
            }
        }
    }
    let routed = RouteAddr {
        addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: read-only presence check.
    if unsafe { ROUTE_ADDRS.get(&routed) }.is_some() {
        SK_DROP
    } else {
        SK_PASS
    }
}
