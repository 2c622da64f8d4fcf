//! Trireme node runtime. Implemented so far: carrying tokens in TCP
//! handshake packets (`packet`). The NFQUEUE enforcer, nftables and PU
//! sources are still to come (see the README).

pub mod packet;
