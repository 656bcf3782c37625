//! The `aws-cni` plugin: wires a pod's network namespace to a VPC address handed out by ipamd.
//!
//! The binary is a thin shell over [`cli::main`]; everything is here so tests can drive the
//! pieces. Pure parts (config, naming, results, versions, errors) do no I/O; side effects live
//! in `netlink`, `pod`, `ipam` and `state`.

pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod ipam;
pub mod logging;
pub mod naming;
pub mod netlink;
pub mod pod;
pub mod policy;
pub mod result;
pub mod sandbox;
pub mod state;
pub mod version;
