//! The `egress-cni` plugin, chained after `aws-cni` as upstream's is: a second veth pair into
//! the pod that gives an IPv6 pod IPv4 egress (`v4if0`) or an IPv4 pod IPv6 egress
//! (`v6if0`), with an address from a node-local range and SNAT to the node's own address.
//!
//! Pure parts (config, range, plan, snat, result) do no I/O; side effects live in `store`
//! (the address reservations, host-local's on-disk layout), `wire` (netlink), `iptables` and
//! `commands`.

pub mod cli;
pub mod commands;
pub mod config;
pub mod iptables;
pub mod plan;
pub mod range;
pub mod result;
pub mod snat;
pub mod store;
pub mod wire;

/// The target of this plugin's log events. It shares aws-cni's logging set-up, which logs its
/// own crate's events at `pluginLogLevel` and holds every other target at WARN; a target under
/// `aws_cni` is what passes that filter.
pub const LOG_TARGET: &str = "aws_cni::egress";

#[macro_export]
#[doc(hidden)]
macro_rules! info {
    ($($t:tt)*) => { tracing::info!(target: $crate::LOG_TARGET, $($t)*) };
}

#[macro_export]
#[doc(hidden)]
macro_rules! warn {
    ($($t:tt)*) => { tracing::warn!(target: $crate::LOG_TARGET, $($t)*) };
}
