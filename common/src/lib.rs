//! Shared by the `aws-cni` plugin and `ipamd`: the one durable file write, the one log
//! rotation, the one set of input rules, the host veth naming, rule priorities and route
//! tables and the policy-rule calls, so the two binaries cannot drift apart. (`cni-proto` is
//! the wire contract only.)
//!
//! Small on purpose: the plugin links it, and the plugin stays small.

pub mod command;
pub mod fsio;
pub mod grpc;
pub mod logfile;
pub mod naming;
pub mod netlink;
pub mod netns;
pub mod state;
pub mod validate;
