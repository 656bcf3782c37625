//! Host-side veth names: the rule lives in `cni_proto` because ipamd must derive the same
//! name when it checks, after a restart, which pods still exist.

pub use cni_common::naming::host_veth_name;
