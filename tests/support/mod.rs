//! Shared test support: a tiny generated model and multi-node helpers.

pub mod cluster;
pub mod tiny_model;
