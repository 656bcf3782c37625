//! Opening what a command works on - the pod's network namespace and a netlink socket on each
//! side - with the CNI error a runtime gets when it cannot be. Shared by `aws-cni` and
//! `egress-cni`.

use std::fs::File;

use crate::error::{CniError, Code, Result};
use crate::netlink::Netlink;

pub fn open_netns(path: &str) -> Result<File> {
    File::open(path).map_err(|e| {
        CniError::new(
            Code::UnknownContainer,
            format!("cannot open network namespace {path}: {e}"),
        )
    })
}

/// The namespace the plugin itself runs in: ADD there would replace the host's own `eth0`
/// and default route. libcni's plugin skeleton refuses it too.
pub fn refuse_own_netns(ns: &File, path: &str) -> Result<()> {
    match cni_common::netns::is_own_netns(ns) {
        Ok(false) => Ok(()),
        Ok(true) => Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_NETNS {path} is the plugin's own network namespace, not a pod's: refusing to rewire the host"),
        )),
        Err(e) => Err(CniError::new(
            Code::Io,
            format!("compare network namespace {path} with the plugin's own: {e}"),
        )),
    }
}

pub fn host_netlink() -> Result<Netlink> {
    Netlink::current().map_err(|e| CniError::new(Code::Io, format!("open netlink socket: {e}")))
}

pub async fn pod_netlink(ns: &File, path: &str) -> Result<Netlink> {
    Netlink::in_netns(ns).await.map_err(|e| {
        CniError::new(
            Code::Io,
            format!("open netlink socket in network namespace {path}: {e}"),
        )
    })
}
