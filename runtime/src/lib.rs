//! `trireme-runtime`: the node enforcer. Data flows one way: config →
//! (keys, PUs, ruleset) → enforcer (handshake state machine, pure) →
//! queue workers and firewall rules (the kernel side).

pub mod by_address;
pub mod config;
pub mod counters;
pub mod endpoints;
pub mod enforcer;
pub mod firewall;
pub mod flowlog;
pub mod flows;
pub mod health;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod nft;
pub mod node;
pub mod packet;
pub mod queue;
