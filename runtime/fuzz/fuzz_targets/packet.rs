//! Any bytes, in either direction, through the packet layer and the whole
//! handshake state machine: never a panic, every drop counted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::sync::OnceLock;
use trireme_compiler::model::Identity;
use trireme_compiler::ruleset::Ruleset;
use trireme_runtime::enforcer::{Enforcer, Hook, Pu};
use trireme_runtime::packet;
use trireme_tokens::handshake::{Config, Credentials, Engine};
use trireme_tokens::keys::Psk;

fn enforcer() -> &'static Enforcer {
    static E: OnceLock<Enforcer> = OnceLock::new();
    E.get_or_init(|| {
        let engine = Engine::new(
            Config::new("fuzz", "trireme"),
            Credentials::Psk(Box::new(Psk::new(&[1; 32]).unwrap())),
        )
        .unwrap();
        let none = std::collections::BTreeMap::<String, String>::new();
        let id = Identity::for_pod("default", &none, &none);
        Enforcer::new(
            engine,
            vec![Pu::new("pu", id, vec![])],
            Ruleset::new(vec![], vec![]),
            HashMap::new(),
            1024,
            10_000,
        )
        .expect("a ruleset without plugins always loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = packet::tcp_meta(data);
    let _ = packet::ip_meta(data);
    if let Ok(Some(s)) = packet::strip(data) {
        // What we strip, we can put back exactly.
        assert_eq!(packet::strip(&packet::attach(&s.packet, &s.token).unwrap()).unwrap().unwrap(), s);
    }
    let e = enforcer();
    let hook = if data.first().is_some_and(|b| b & 1 == 1) { Hook::In } else { Hook::Out };
    let _ = e.handle(0, hook, data, 1_800_000_000_000);
});
