//! llmesh: pool a team's machines into one OpenAI-compatible AI cluster.
//!
//! The binary (`src/main.rs`) only parses the command line; everything lives here so tests can
//! start nodes in-process. Start at [`node::Node::spawn`].

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod hardware;
pub mod node;
pub mod p2p;
pub mod router;
pub mod service;
