pub mod instance_types;
pub mod maxpods;
