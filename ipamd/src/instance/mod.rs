//! The instance: per-type ENI and address limits, the max-pods formula, and the node file
//! of standalone mode.

pub mod maxpods;
pub mod node_file;
pub mod types;
