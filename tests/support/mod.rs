//! Shared test support: a tiny generated model and multi-node helpers.

pub mod cluster;
pub mod demo_models;
pub mod fake_engine;
pub mod netns;
pub mod overlay;
pub mod tiny_model;
