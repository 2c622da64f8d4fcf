//! The runtime's HTTP endpoints (`metricsAddress`): `/metrics` for
//! Prometheus, `/healthz` and `/readyz` for the node's probes. Plain
//! HTTP/1.1 on one thread: a scrape every few seconds needs no more, and
//! nothing here touches the datapath.

use crate::enforcer::Enforcer;
use crate::health::Health;
use crate::metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use tiny_http::{Header, Method, Request, Response, Server};

/// A bound listener, not yet serving: the address is taken before the PUs
/// are programmed, so that a port already in use stops the start instead
/// of leaving a node enforced but unobservable.
pub struct Bound {
    server: Server,
    pub addr: SocketAddr,
}

pub fn bind(addr: SocketAddr) -> Result<Bound, String> {
    let server = Server::http(addr).map_err(|e| format!("metricsAddress {addr}: {e}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metricsAddress {addr}: not an IP listener"))?;
    Ok(Bound { server, addr })
}

impl Bound {
    pub fn serve(self, e: Arc<Enforcer>, health: Arc<Health>, node: String) -> Result<(), String> {
        std::thread::Builder::new()
            .name("endpoints".into())
            .spawn(move || {
                for req in self.server.incoming_requests() {
                    answer(req, &e, &health, &node);
                }
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn text(
    body: String,
    status: u16,
    content_type: &'static str,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let ct = Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        .expect("a static header is valid");
    Response::from_string(body)
        .with_status_code(status)
        .with_header(ct)
}

fn answer(req: Request, e: &Enforcer, health: &Health, node: &str) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let path = req.url().split('?').next().unwrap_or("");
    let resp = match (req.method(), path) {
        (Method::Get | Method::Head, "/metrics") => {
            let kernel: Vec<_> = health
                .pus()
                .into_iter()
                .map(|(name, netns)| {
                    let s = metrics::kernel_stats(&netns);
                    (name, s)
                })
                .collect();
            text(
                metrics::render(e, node, &kernel),
                200,
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        (Method::Get | Method::Head, "/healthz") => match health.live() {
            Ok(()) => text("ok\n".into(), 200, PLAIN),
            Err(why) => text(format!("{why}\n"), 503, PLAIN),
        },
        (Method::Get | Method::Head, "/readyz") => match health.ready() {
            Ok(()) => text("ok\n".into(), 200, PLAIN),
            Err(why) => text(format!("{why}\n"), 503, PLAIN),
        },
        (Method::Get | Method::Head, _) => text(
            "not found: try /metrics, /healthz or /readyz\n".into(),
            404,
            PLAIN,
        ),
        _ => text("method not allowed\n".into(), 405, PLAIN),
    };
    let _ = req.respond(resp);
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_address_in_use_is_a_clear_error() {
        let first = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = super::bind(first.addr).err().expect("the port is taken");
        assert!(
            err.starts_with(&format!("metricsAddress {}:", first.addr)),
            "{err}"
        );
    }
}
