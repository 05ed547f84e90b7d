//! Kernel side of canary: an ingress program (XDP, or TC on virtual interfaces, see
//! `frame`) that places each new connection to a service on a stable or canary backend
//! and rewrites its destination, and a TC egress program that restores the service
//! address as the source of the replies; for `http` services an `sk_lookup` program and
//! an `sk_skb` verdict that splice routed connections.
#![no_std]
#![no_main]

mod checksum;
mod egress;
mod forward;
mod frame;
mod ingress;
mod maps;
mod parse;
mod route;
mod splice;
mod telemetry;

use canary_common::{FORWARD_REDIRECT, SETTING_REPLIES_AT_INGRESS};

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, sk_lookup, stream_verdict, xdp},
    programs::{SkBuffContext, SkLookupContext, TcContext, XdpContext},
};

/// Client -> service direction. Never drops: anything that is not ours passes untouched.
#[xdp]
pub fn canary_ingress(ctx: XdpContext) -> u32 {
    let _ = ingress::handle(&ctx);
    xdp_action::XDP_PASS
}

/// Client -> service direction at TC ingress: the same logic on the skb. Never drops.
#[classifier]
pub fn canary_ingress_tc(ctx: TcContext) -> i32 {
    if frame::tc_headers_linear(&ctx) {
        let to = ingress::handle(&ctx).or_else(|| {
            // A reply of a redirected flow, on the backend's interface (one array read
            // decides whether to look: nothing extra when no service redirects).
            let on = maps::SETTINGS.get(0).copied().unwrap_or(0);
            (on & SETTING_REPLIES_AT_INGRESS != 0)
                .then(|| egress::handle(&ctx, egress::At::Ingress))
                .flatten()
        });
        if let Some(to) = to.filter(|to| to.forward == FORWARD_REDIRECT) {
            return forward::redirect(&ctx, &to);
        }
    }
    TC_ACT_OK as i32
}

/// Backend -> client direction. Never drops.
#[classifier]
pub fn canary_egress(ctx: TcContext) -> i32 {
    if frame::tc_headers_linear(&ctx) {
        let _ = egress::handle(&ctx, egress::At::Egress);
    }
    TC_ACT_OK as i32
}

/// New connections to an `http` service go to the agent's router listener; anything
/// else to a routed service address is refused.
#[sk_lookup]
pub fn canary_route_lookup(ctx: SkLookupContext) -> u32 {
    route::handle(&ctx)
}

/// Bytes of a spliced connection go straight to the other socket.
#[stream_verdict]
pub fn canary_route_verdict(ctx: SkBuffContext) -> u32 {
    splice::verdict(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
