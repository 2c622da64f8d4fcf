fn main() {
    let h = trireme_plugin_host::Host::new(trireme_plugin_host::Limits::offline()).unwrap();
    for p in std::env::args().skip(1) {
        let w = std::fs::read(&p).unwrap();
        match h.load("x", &w, None, None) {
            Ok(pl) => {
                println!("{p}: {:?} {:?}", pl.hooks(), pl.metadata());
                if pl.hooks().resolve {
                    println!("  {:?}", pl.resolve(r#"{"kind":"pod","name":"a","namespace":"x","annotations":{},"images":["registry.example.com/payments/api:1"],"labels":{"app":"a"},"namespaceLabels":{}}"#));
                }
            }
            Err(e) => println!("{p}: {e}"),
        }
    }
}
