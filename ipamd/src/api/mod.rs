//! What ipamd serves: gRPC for the plugin and probes, HTTP for metrics and introspection.

pub mod grpc;
pub mod http;
