//! ipamd: the node daemon that holds a pool of VPC addresses and hands them to `aws-cni`.
//!
//! Pure logic (`datastore`, `maxpods`, `instance_types`, `config`) is kept apart from side
//! effects (`checkpoint` files, the gRPC `server`, the `daemon` that wires them together).

pub mod checkpoint;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod datastore;
pub mod eni;
pub mod entrypoint;
pub mod http;
pub mod instance_types;
pub mod limits;
pub mod logging;
pub mod manager;
pub mod maxpods;
pub mod metrics;
pub mod netconf;
pub mod node;
pub mod pool;
pub mod server;
pub mod supervise;
pub mod sweep;
pub mod warm;
