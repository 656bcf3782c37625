//! Shared by the `aws-cni` plugin and `ipamd`: the one durable file write, the one log
//! rotation and the one set of input rules, so the two binaries cannot drift apart.
//!
//! Small on purpose: the plugin links it, and the plugin stays small.

pub mod fsio;
pub mod logfile;
pub mod state;
pub mod validate;
