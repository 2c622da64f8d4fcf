//! The handshake state machine on byte-exact packets, two enforcers
//! in-process (no kernel): retransmissions, source-port reuse, simultaneous
//! open, RST during the handshake, replayed ACKs, a bounded table and
//! arbitrary bytes.

use etherparse::PacketBuilder;
use proptest::prelude::*;
use std::collections::HashMap;
use trireme_compiler::model::Identity;
use trireme_compiler::ruleset::Ruleset;
use trireme_runtime::enforcer::{Enforcer, Hook, Inventory, Pu, Verdict};
use trireme_runtime::flows::FlowKey;
use trireme_tokens::handshake::{Config, Credentials, Engine};
use trireme_tokens::keys::Psk;

const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 18, 0, 2];
const NOW: u64 = 1_800_000_000_000;

fn node(name: &str, role: &str, max_flows: usize) -> Enforcer {
    let engine = Engine::new(
        Config::new(name, "trireme"),
        Credentials::Psk(Box::new(Psk::new(&[42; 32]).unwrap())),
    )
    .unwrap();
    let none = std::collections::BTreeMap::<String, String>::new();
    let mut id = Identity::for_pod("default", &none, &none);
    id.insert("role", role);
    let pus = vec![Pu::new(role, id, vec![])];
    Enforcer::new(
        engine,
        pus,
        Ruleset::new(vec![], vec![]),
        HashMap::new(),
        max_flows,
        10_000,
    )
    .expect("a ruleset without plugins always loads")
}

/// A TCP packet from `src:sport` to `dst:dport` with SYN-like options.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: &str, seq: u32) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 64240);
    let b = if flags.contains('S') { b.syn() } else { b };
    let b = if flags.contains('A') { b.ack(1000) } else { b };
    let b = if flags.contains('R') { b.rst() } else { b };
    let b = b
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(1460),
            etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::WindowScale(7),
        ])
        .unwrap();
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn rewritten(v: Verdict) -> Vec<u8> {
    match v {
        Verdict::Rewrite(p)
        | Verdict::Authorize(Some(p))
        | Verdict::Provisional(p)
        | Verdict::Revoke(p) => p,
        other => panic!("expected a rewritten packet, got {other:?}"),
    }
}

struct Hs {
    syn: Vec<u8>,
    synack: Vec<u8>,
    ack: Vec<u8>,
}

fn packets(sport: u16) -> Hs {
    Hs {
        syn: tcp(A, sport, B, 80, "S", 1),
        synack: tcp(B, 80, A, sport, "SA", 7),
        ack: tcp(A, sport, B, 80, "A", 2),
    }
}

/// Runs a full handshake; returns the verdicts the kernel would apply.
fn handshake(a: &Enforcer, b: &Enforcer, p: &Hs, t: u64) -> (Verdict, Verdict) {
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, t));
    assert_ne!(syn, p.syn, "token attached");
    let at_b = rewritten(b.handle(0, Hook::In, &syn, t));
    assert_eq!(at_b, p.syn, "the server's stack sees the original SYN");
    let synack = rewritten(b.handle(0, Hook::Out, &p.synack, t));
    let at_a = rewritten(a.handle(0, Hook::In, &synack, t));
    assert_eq!(at_a, p.synack);
    let va = a.handle(0, Hook::Out, &p.ack, t);
    let ack = match &va {
        Verdict::Provisional(p) => p.clone(),
        other => panic!("the initiator's ACK should carry the token and mark: {other:?}"),
    };
    let vb = b.handle(0, Hook::In, &ack, t);
    (va, vb)
}

#[test]
fn full_handshake_authorizes_both_sides_and_restores_packets() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40000);
    let (_, vb) = handshake(&a, &b, &p, NOW);
    assert_eq!(vb, Verdict::Authorize(Some(p.ack.clone())));
    assert_eq!(b.counters.get("authorized"), 1);
    // The initiator's token ACK marks its side, provisionally.
    assert_eq!(a.counters.get("authorized"), 1);
    // A segment queued behind the ACK before the mark took effect passes.
    let data = tcp(A, 40000, B, 80, "A", 2);
    assert_eq!(b.handle(0, Hook::In, &data, NOW), Verdict::Authorize(None));
    // Each kind of packet is counted, with the time spent on it.
    for (node, kind, n) in [
        (&a, "syn_out", 1),
        (&b, "syn_in", 1),
        (&b, "synack_out", 1),
        (&a, "synack_in", 1),
        (&a, "ack_out", 1),
        (&b, "ack_in", 2),
    ] {
        let count = node.counters.get(&format!("handled_{kind}"));
        assert_eq!(count, n, "{kind}");
        assert!(
            node.counters.get(&format!("handled_{kind}_ns")) > 0,
            "{kind}"
        );
    }
    assert_eq!(a.counters.get("handled_syn_in"), 0);
}

#[test]
fn retransmitted_syn_and_synack_are_recognised_not_replays() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40001);
    let syn1 = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    let syn2 = rewritten(a.handle(0, Hook::Out, &p.syn, NOW + 1000));
    assert_eq!(syn1, syn2, "a retransmitted SYN carries the same token");
    rewritten(b.handle(0, Hook::In, &syn1, NOW));
    rewritten(b.handle(0, Hook::In, &syn2, NOW + 1000));
    assert_eq!(b.counters.get("token_replay"), 0);
    assert_eq!(b.counters.get("syn_retransmitted"), 1);
    let sa1 = rewritten(b.handle(0, Hook::Out, &p.synack, NOW));
    let sa2 = rewritten(b.handle(0, Hook::Out, &p.synack, NOW + 1000));
    assert_eq!(sa1, sa2);
    rewritten(a.handle(0, Hook::In, &sa1, NOW));
    rewritten(a.handle(0, Hook::In, &sa2, NOW + 1000));
    let ack = rewritten(a.handle(0, Hook::Out, &p.ack, NOW));
    assert!(matches!(
        b.handle(0, Hook::In, &ack, NOW),
        Verdict::Authorize(Some(_))
    ));
    // A token-carrying ACK other than the one accepted is refused.
    let mut forged = ack.clone();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert!(matches!(
        b.handle(0, Hook::In, &forged, NOW),
        Verdict::Drop(_)
    ));
}

#[test]
fn a_lost_ack_is_recovered_not_stalled() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40010);
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn, NOW));
    let synack = rewritten(b.handle(0, Hook::Out, &p.synack, NOW));
    rewritten(a.handle(0, Hook::In, &synack, NOW));
    let lost = a.handle(0, Hook::Out, &p.ack, NOW);
    assert!(matches!(lost, Verdict::Provisional(_)), "{lost:?}");
    // The client's first data reaches the server without a token: held
    // (it might have overtaken the ACK), not accepted.
    let mut data = Vec::new();
    etherparse::PacketBuilder::ipv4(A, B, 64)
        .tcp(40010, 80, 2, 64240)
        .ack(1000)
        .psh()
        .write(&mut data, b"hello")
        .unwrap();
    assert_eq!(a.handle(0, Hook::Out, &data, NOW), Verdict::Accept);
    let key = FlowKey {
        pu: 0,
        local: (B, 80).into(),
        remote: (A, 40010).into(),
    };
    assert_eq!(b.handle(0, Hook::In, &data, NOW), Verdict::Hold(key));
    assert_eq!(key.local.port(), 80);
    assert!(!b.authorized(&key, NOW), "held until the ACK is verified");
    // The server re-sends its SYN-ACK: it revokes the client's provisional
    // mark; the client's kernel answers with an ACK, which carries the
    // token again and marks again; the server completes.
    let synack2 = rewritten(b.handle(0, Hook::Out, &p.synack, NOW + 1000));
    assert_eq!(synack, synack2);
    let revoked = a.handle(0, Hook::In, &synack2, NOW + 1000);
    assert_eq!(revoked, Verdict::Revoke(p.synack.clone()));
    assert_eq!(a.counters.get("revoked"), 1);
    let ack2 = a.handle(0, Hook::Out, &p.ack, NOW + 1000);
    let ack2 = match ack2 {
        Verdict::Provisional(p) => p,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        b.handle(0, Hook::In, &ack2, NOW + 1000),
        Verdict::Authorize(Some(_))
    ));
    assert!(
        b.authorized(&key, NOW + 1000),
        "what releases the held data"
    );
    // A further copy of that same ACK passes; a different token does not.
    assert!(matches!(
        b.handle(0, Hook::In, &ack2, NOW + 1001),
        Verdict::Authorize(Some(_))
    ));
    // Data the client queued while revoked passes; the server's reply (which
    // reaches the queue only while the flow is revoked) authorizes it again.
    assert_eq!(a.handle(0, Hook::Out, &data, NOW + 1001), Verdict::Accept);
    let reply = tcp(B, 80, A, 40010, "A", 8);
    assert_eq!(
        a.handle(0, Hook::In, &reply, NOW + 1002),
        Verdict::Authorize(None)
    );
}

#[test]
fn source_port_reuse_starts_a_fresh_handshake() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40002);
    handshake(&a, &b, &p, NOW);
    // Same 4-tuple, a new connection a little later: a new nonce, accepted.
    let (_, vb) = handshake(&a, &b, &p, NOW + 500);
    assert!(matches!(vb, Verdict::Authorize(Some(_))));
    assert_eq!(b.counters.get("token_replay"), 0);
}

#[test]
fn rst_during_the_handshake_clears_the_flow() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40003);
    let syn1 = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn1, NOW));
    let rst = tcp(A, 40003, B, 80, "R", 2);
    assert_eq!(a.handle(0, Hook::Out, &rst, NOW), Verdict::Accept);
    assert_eq!(b.handle(0, Hook::In, &rst, NOW), Verdict::Accept);
    // B forgot the SYN: an ACK now is not part of any handshake.
    assert_eq!(
        b.handle(0, Hook::Out, &p.synack, NOW),
        Verdict::Drop("synack_without_flow")
    );
    // A reconnect on the same port gets a new nonce and goes through.
    let syn2 = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    assert_ne!(syn1, syn2);
    let (_, vb) = handshake(&a, &b, &packets(40003), NOW + 10);
    assert!(matches!(vb, Verdict::Authorize(Some(_))));
}

#[test]
fn simultaneous_open_never_authorizes_without_verification() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    // Both sides send a SYN on the same 4-tuple.
    let syn_a = rewritten(a.handle(0, Hook::Out, &tcp(A, 5000, B, 5001, "S", 1), NOW));
    let syn_b = rewritten(b.handle(0, Hook::Out, &tcp(B, 5001, A, 5000, "S", 9), NOW));
    // Each receives the other's SYN: verified as a responder would.
    rewritten(a.handle(0, Hook::In, &syn_b, NOW));
    rewritten(b.handle(0, Hook::In, &syn_a, NOW));
    // Each kernel answers with a SYN-ACK, which carries a token.
    let sa_a = rewritten(a.handle(0, Hook::Out, &tcp(A, 5000, B, 5001, "SA", 1), NOW));
    let sa_b = rewritten(b.handle(0, Hook::Out, &tcp(B, 5001, A, 5000, "SA", 9), NOW));
    // Neither side is an initiator any more: refused cleanly.
    for v in [
        a.handle(0, Hook::In, &sa_b, NOW),
        b.handle(0, Hook::In, &sa_a, NOW),
    ] {
        assert_eq!(v, Verdict::Drop("synack_unexpected"));
    }
    assert_eq!(
        a.counters.get("authorized") + b.counters.get("authorized"),
        0
    );
}

#[test]
fn unauthorized_segments_are_dropped_and_tokenless_acks_held() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40004);
    assert_eq!(
        b.handle(0, Hook::In, &p.ack, NOW),
        Verdict::Drop("unauthorized_flow")
    );
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn, NOW));
    rewritten(b.handle(0, Hook::Out, &p.synack, NOW));
    // An ACK without our token (a spoofer, or the initiator's data that
    // overtook its token ACK) is held, never accepted: the queue accepts it
    // only once the flow is authorized, and drops it at a deadline.
    assert!(matches!(
        b.handle(0, Hook::In, &p.ack, NOW),
        Verdict::Hold(_)
    ));
    assert_eq!(b.counters.get("authorized"), 0);
}

/// The server's kernel still holds an older connection on the tuple and
/// answers a new SYN with a bare ACK: it leaves the responder and enters the
/// initiator (whose kernel resets the stale connection), unmarked; the
/// SYN's retransmission then completes a normal handshake.
#[test]
fn a_stale_connection_ack_passes_unmarked_and_the_retransmitted_syn_completes() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40005);
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn, NOW));
    let stale = tcp(B, 80, A, 40005, "A", 777);
    assert_eq!(b.handle(0, Hook::Out, &stale, NOW), Verdict::Accept);
    assert_eq!(a.handle(0, Hook::In, &stale, NOW), Verdict::Accept);
    assert_eq!(a.counters.get("stale_connection_ack"), 1);
    assert_eq!(b.counters.get("stale_connection_ack"), 1);
    // Data from the server in that state is still refused.
    let mut data = Vec::new();
    PacketBuilder::ipv4(B, A, 64)
        .tcp(80, 40005, 777, 64240)
        .ack(1000)
        .write(&mut data, b"x")
        .unwrap();
    assert_eq!(
        b.handle(0, Hook::Out, &data, NOW),
        Verdict::Drop("unauthorized_flow")
    );
    // The retransmitted SYN (same bytes) is recognised; the handshake completes.
    let again = rewritten(a.handle(0, Hook::Out, &p.syn, NOW + 1000));
    assert_eq!(again, syn);
    rewritten(b.handle(0, Hook::In, &again, NOW + 1000));
    let synack = rewritten(b.handle(0, Hook::Out, &p.synack, NOW + 1000));
    rewritten(a.handle(0, Hook::In, &synack, NOW + 1000));
    let ack = match a.handle(0, Hook::Out, &p.ack, NOW + 1000) {
        Verdict::Provisional(x) => x,
        v => panic!("{v:?}"),
    };
    assert!(matches!(
        b.handle(0, Hook::In, &ack, NOW + 1000),
        Verdict::Authorize(Some(_))
    ));
}

#[test]
fn the_table_is_bounded() {
    let a = node("node-a", "client", 16);
    for port in 0..1000u16 {
        rewritten(a.handle(0, Hook::Out, &tcp(A, 10000 + port, B, 80, "S", 1), NOW));
    }
    let (len, evicted, _) = a.flow_stats();
    assert_eq!(len, 16);
    assert_eq!(evicted, 984);
}

#[test]
fn handshake_state_expires() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40005);
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn, NOW));
    // Past the 10 s handshake timeout the SYN-ACK finds no flow.
    assert_eq!(
        b.handle(0, Hook::Out, &p.synack, NOW + 10_001),
        Verdict::Drop("synack_without_flow")
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), out in any::<bool>()) {
        let a = node("node-a", "client", 16);
        let hook = if out { Hook::Out } else { Hook::In };
        let _ = a.handle(0, hook, &bytes, NOW);
        let _ = a.handle(7, hook, &bytes, NOW);
    }
}

#[test]
fn holding_is_bounded_node_wide() {
    let b = node("node-b", "server", 64);
    for _ in 0..Enforcer::HOLD_MAX {
        assert!(b.try_hold());
    }
    assert!(!b.try_hold(), "the node holds at most HOLD_MAX segments");
    b.unhold();
    assert!(b.try_hold());
}

/// A PU removed by a reload: its packets still in the queue are dropped
/// (nothing is allowed for a PU that is gone), its handshakes are
/// forgotten, and a PU that later takes its slot starts clean.
#[test]
fn a_removed_pus_slot_allows_nothing_and_is_reused_clean() {
    let (a, b) = (node("node-a", "client", 64), node("node-b", "server", 64));
    let p = packets(40100);
    let syn = rewritten(a.handle(0, Hook::Out, &p.syn, NOW));
    rewritten(b.handle(0, Hook::In, &syn, NOW));
    assert_eq!(b.flow_stats().0, 1, "the responder remembers the SYN");
    let server = b.pus()[0].1.clone();
    let rs = || Ruleset::new(vec![], vec![]);
    let gone = Inventory {
        pus: vec![None],
        ..Inventory::default()
    };
    b.install(b.prepare_with(rs(), gone).unwrap());
    b.forget_pu(0);
    assert_eq!(b.flow_stats().0, 0);
    assert!(b.pus().is_empty());
    assert_eq!(
        b.handle(0, Hook::Out, &p.synack, NOW),
        Verdict::Drop("unknown_pu")
    );
    assert_eq!(
        b.handle(0, Hook::In, &syn, NOW),
        Verdict::Drop("unknown_pu")
    );
    assert_eq!(b.counters.get("unknown_pu"), 2);
    // The slot serves a PU again: a fresh handshake completes.
    let back = Inventory {
        pus: vec![Some(server)],
        ..Inventory::default()
    };
    b.install(b.prepare_with(rs(), back).unwrap());
    let p = packets(40101);
    let (_, vb) = handshake(&a, &b, &p, NOW + 1);
    assert_eq!(vb, Verdict::Authorize(Some(p.ack.clone())));
}

/// One node serving both PUs (client at A in slot 0, server at B in slot
/// 1) under `policies` (NetworkPolicy YAML; none: all allowed).
fn one_node(policies: Option<&str>) -> Enforcer {
    let engine = Engine::new(
        Config::new("node-a", "trireme"),
        Credentials::Psk(Box::new(Psk::new(&[42; 32]).unwrap())),
    )
    .unwrap();
    let none = std::collections::BTreeMap::<String, String>::new();
    let pu = |role: &str| {
        let mut id = Identity::for_pod("default", &none, &none);
        id.insert("role", role);
        Pu::new(role, id, vec![])
    };
    let rs = match policies {
        None => Ruleset::new(vec![], vec![]),
        Some(yaml) => {
            let dir = std::env::temp_dir().join(format!("trst{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let src = dir.join("p.yaml");
            std::fs::write(&src, yaml).unwrap();
            let loaded = trireme_compiler::source::load(&[src]).expect("policies compile");
            let _ = std::fs::remove_dir_all(&dir);
            trireme_compiler::compile::compile(&loaded)
        }
    };
    let e = Enforcer::new(
        engine,
        vec![pu("client"), pu("server")],
        rs,
        HashMap::new(),
        64,
        10_000,
    )
    .unwrap();
    e.set_local_ips(HashMap::from([(A.into(), 0), (B.into(), 1)]));
    e
}

/// Two PUs of one node: the initiator decides egress on the SYN (the
/// runtime knows its peer first-hand) and marks it; the responder admits
/// the SYN it saw leave, on its token, and marks too. Two trips instead
/// of six; the kernel carries the SYN-ACK and ACK. Retransmissions pass
/// on both sides, denials are made where they always were, and a SYN
/// nobody witnessed (or a replay) takes the handshake between nodes.
#[test]
fn a_same_node_handshake_is_decided_on_the_syn() {
    let n = one_node(None);
    let p = packets(41000);
    let syn = match n.handle(0, Hook::Out, &p.syn, NOW) {
        Verdict::Authorize(Some(s)) => s,
        other => panic!("the initiator marks a same-node SYN: {other:?}"),
    };
    assert_ne!(syn, p.syn, "the SYN still carries the token");
    assert_eq!(
        n.handle(1, Hook::In, &syn, NOW),
        Verdict::Authorize(Some(p.syn.clone()))
    );
    assert_eq!(n.counters.get("local_handshakes"), 1);
    assert_eq!(n.counters.get("authorized"), 2);
    // Only if a mark was not in place yet do the rest come here; they pass.
    assert_eq!(
        n.handle(1, Hook::Out, &p.synack, NOW),
        Verdict::Authorize(None)
    );
    assert_eq!(
        n.handle(0, Hook::In, &p.synack, NOW),
        Verdict::Authorize(None)
    );
    assert_eq!(
        n.handle(0, Hook::Out, &p.ack, NOW),
        Verdict::Authorize(None)
    );
    assert_eq!(n.handle(1, Hook::In, &p.ack, NOW), Verdict::Authorize(None));
    // A retransmitted SYN (the first was lost, or refused by a full
    // backlog): the same token again, marked again on both sides.
    let again = match n.handle(0, Hook::Out, &p.syn, NOW + 1000) {
        Verdict::Authorize(Some(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(again, syn);
    assert_eq!(
        n.handle(1, Hook::In, &again, NOW + 1000),
        Verdict::Authorize(Some(p.syn.clone()))
    );
    assert_eq!(n.counters.get("syn_retransmitted"), 2);
    // The same token on another tuple is a replay.
    let other = packets(41001);
    let token = trireme_runtime::packet::strip(&syn).unwrap().unwrap().token;
    let replay = trireme_runtime::packet::attach(&other.syn, &token).unwrap();
    assert_eq!(
        n.handle(1, Hook::In, &replay, NOW),
        Verdict::Drop("token_replay")
    );
    // A SYN from elsewhere with a fresh token for a local address, never
    // seen leaving the initiator's namespace: the full handshake.
    let far = node("node-b", "client", 64);
    let from_far = rewritten(far.handle(0, Hook::Out, &other.syn, NOW));
    assert_eq!(
        n.handle(1, Hook::In, &from_far, NOW),
        Verdict::Rewrite(other.syn.clone())
    );
    assert_eq!(n.counters.get("local_handshakes"), 1);
}

#[test]
fn a_same_node_handshake_denies_where_the_other_does() {
    let deny_ingress = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: default}
spec:
  podSelector: {matchLabels: {role: server}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {role: nobody}}}]}]
";
    let n = one_node(Some(deny_ingress));
    let p = packets(42000);
    let syn = match n.handle(0, Hook::Out, &p.syn, NOW) {
        Verdict::Authorize(Some(s)) => s,
        other => panic!("egress is open: {other:?}"),
    };
    assert_eq!(
        n.handle(1, Hook::In, &syn, NOW),
        Verdict::Drop("ingress_denied")
    );
    // Its retransmission too, without another verification.
    assert_eq!(
        n.handle(0, Hook::Out, &p.syn, NOW + 1000),
        Verdict::Authorize(Some(syn.clone()))
    );
    assert_eq!(
        n.handle(1, Hook::In, &syn, NOW + 1000),
        Verdict::Drop("ingress_denied")
    );
    assert_eq!(n.counters.get("local_handshakes"), 0);

    let deny_egress = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: default}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {role: server}}}], ports: [{port: 443}]}]
";
    let n = one_node(Some(deny_egress));
    // Decided on the SYN, on the server's labels: nothing leaves.
    assert_eq!(
        n.handle(0, Hook::Out, &p.syn, NOW),
        Verdict::Drop("egress_denied")
    );
    assert_eq!(n.flow_stats().0, 0, "no state kept for a denied SYN");
    let to_443 = tcp(A, 42001, B, 443, "S", 1);
    assert!(matches!(
        n.handle(0, Hook::Out, &to_443, NOW),
        Verdict::Authorize(Some(_))
    ));
}
