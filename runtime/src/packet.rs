//! Carrying a token inside a TCP handshake packet, and taking it out again.
//!
//! The token travels as the first bytes of the TCP payload, announced by
//! a marker option at the *end* of the TCP options: kind 253 (RFC 4727
//! experimental) with an RFC 6994 experiment id of our own and the token
//! length, then two NOPs to keep the options 32-bit aligned:
//!
//! ```text
//! [original options][253, 6, 0x54, 0x52, len_hi, len_lo][1, 1][token][original payload]
//! ```
//!
//! Because the marker sits at the end and carries the token length,
//! stripping restores the original bytes exactly: options, payload, IP
//! lengths and checksums. The packet is edited as raw bytes; etherparse
//! validates the headers and finds the offsets, so fields we do not touch
//! (IPv4 options, IPv6 extension headers, TCP reserved bits) pass through
//! unchanged.

use etherparse::checksum::Sum16BitWords;
use etherparse::{IpNumber, IpSlice, TcpHeaderSlice};

/// TCP option kind for experiments (RFC 4727), shared using RFC 6994 ids.
pub const OPTION_KIND: u8 = 253;
/// Our RFC 6994 experiment id: "TR". Not IANA-registered; chosen so that
/// it does not collide with registered ids (TCP Fast Open's 0xF989 among them).
pub const EXPERIMENT_ID: u16 = 0x5452;
/// Marker option (6 bytes) plus two NOPs of padding.
pub const MARKER_LEN: usize = 8;
/// TCP header limit: 60 bytes, 40 of them options.
const MAX_TCP_HEADER: usize = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("not a valid IPv4/IPv6 packet: {0}")]
    Ip(String),
    #[error("not TCP")]
    NotTcp,
    #[error("fragmented packet")]
    Fragmented,
    #[error("invalid TCP header: {0}")]
    Tcp(String),
    #[error("no room for the marker option ({0} bytes of options already)")]
    NoRoom(usize),
    #[error("token of {0} bytes is too large")]
    TokenTooLarge(usize),
    #[error("marker announces {announced} token bytes, payload has {available}")]
    BadMarker { announced: usize, available: usize },
}

impl PacketError {
    /// Metric label for packets dropped for this reason.
    pub fn counter(&self) -> &'static str {
        match self {
            PacketError::Ip(_) => "packet_ip_invalid",
            PacketError::NotTcp => "packet_not_tcp",
            PacketError::Fragmented => "packet_fragmented",
            PacketError::Tcp(_) => "packet_tcp_invalid",
            PacketError::NoRoom(_) => "packet_no_option_room",
            PacketError::TokenTooLarge(_) => "packet_token_too_large",
            PacketError::BadMarker { .. } => "packet_bad_marker",
        }
    }
}

/// TCP flag bits (byte 13 of the header).
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// What the enforcer needs to know about a TCP packet to find its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpMeta {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub flags: u8,
    /// TCP payload bytes (the token included, if any).
    pub payload_len: usize,
}

/// The IP layer, validated, without copying anything: etherparse's owned
/// `IpHeaders` carries buffers for every possible extension header (kilobytes
/// moved per call), and this runs on every handshake packet.
fn ip(pkt: &[u8]) -> Result<IpSlice<'_>, PacketError> {
    IpSlice::from_slice(pkt).map_err(|e| PacketError::Ip(e.to_string()))
}

/// The TCP segment of a validated IP packet: (IP header length including
/// extension headers, TCP header, IP payload end).
fn tcp<'a>(
    pkt: &'a [u8],
    ip: &IpSlice<'a>,
) -> Result<(usize, TcpHeaderSlice<'a>, usize), PacketError> {
    let payload = ip.payload();
    if payload.ip_number != IpNumber::TCP {
        return Err(PacketError::NotTcp);
    }
    if payload.fragmented {
        return Err(PacketError::Fragmented);
    }
    let segment = payload.payload;
    // The payload is a sub-slice of `pkt`: its offset is the headers' length.
    // (Checked, so that an empty payload etherparse might return as a
    // slice of its own can never yield a bogus offset.)
    let ip_header_len = (segment.as_ptr() as usize)
        .checked_sub(pkt.as_ptr() as usize)
        .filter(|o| o + segment.len() <= pkt.len())
        .ok_or_else(|| PacketError::Ip("payload outside the packet".into()))?;
    let tcp = TcpHeaderSlice::from_slice(segment).map_err(|e| PacketError::Tcp(e.to_string()))?;
    Ok((ip_header_len, tcp, ip_header_len + segment.len()))
}

/// Addresses, ports and flags, validating the headers as `strip` would.
pub fn tcp_meta(pkt: &[u8]) -> Result<TcpMeta, PacketError> {
    use std::net::SocketAddr;
    let ip = ip(pkt)?;
    let (t, tcp, end) = tcp(pkt, &ip)?;
    Ok(TcpMeta {
        src: SocketAddr::new(ip.source_addr(), tcp.source_port()),
        dst: SocketAddr::new(ip.destination_addr(), tcp.destination_port()),
        flags: pkt[t + 13],
        payload_len: end - t - tcp.slice().len(),
    })
}

/// Addresses and ports of a non-TCP packet (UDP and SCTP carry both
/// ports in their first four bytes; other protocols get port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpMeta {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

pub fn ip_meta(pkt: &[u8]) -> Result<IpMeta, PacketError> {
    let ip = ip(pkt)?;
    let (src, dst) = (ip.source_addr(), ip.destination_addr());
    let payload = ip.payload();
    let protocol = payload.ip_number.0;
    let p = payload.payload;
    let (src_port, dst_port) = if matches!(protocol, 17 | 132) && !payload.fragmented {
        if p.len() < 4 {
            return Err(PacketError::Ip("truncated transport header".into()));
        }
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
    } else {
        (0, 0)
    };
    Ok(IpMeta {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
    })
}

/// Where things are in a packet.
struct Layout {
    v4: bool,
    ip_header_len: usize,
    tcp_header_len: usize,
    /// IP payload end (trailing link-layer padding excluded).
    end: usize,
    /// Source and destination addresses for the pseudo-header: 4 or 16
    /// bytes each, in place (no allocation per packet).
    addrs: [u8; 32],
}

impl Layout {
    fn addrs(&self) -> &[u8] {
        &self.addrs[..if self.v4 { 8 } else { 32 }]
    }
}

fn layout(pkt: &[u8]) -> Result<Layout, PacketError> {
    let ip = ip(pkt)?;
    let (ip_header_len, tcp, end) = tcp(pkt, &ip)?;
    let mut addrs = [0u8; 32];
    let v4 = match &ip {
        IpSlice::Ipv4(h) => {
            addrs[..4].copy_from_slice(&h.header().source());
            addrs[4..8].copy_from_slice(&h.header().destination());
            true
        }
        IpSlice::Ipv6(h) => {
            addrs[..16].copy_from_slice(&h.header().source());
            addrs[16..].copy_from_slice(&h.header().destination());
            false
        }
    };
    Ok(Layout {
        v4,
        ip_header_len,
        tcp_header_len: tcp.slice().len(),
        end,
        addrs,
    })
}

/// Rewrite lengths and checksums after the TCP segment changed size.
fn fix(out: &mut [u8], l: &Layout) {
    let ip_len = out.len();
    let seg_len = ip_len - l.ip_header_len;
    if l.v4 {
        out[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        out[10..12].copy_from_slice(&[0, 0]);
        let ihl = ((out[0] & 0x0f) as usize) * 4;
        let sum = Sum16BitWords::new()
            .add_slice(&out[..ihl])
            .ones_complement();
        // etherparse sums native-endian words: native bytes are wire order.
        out[10..12].copy_from_slice(&sum.to_ne_bytes());
    } else {
        // Payload length counts extension headers too.
        out[4..6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
    }
    let t = l.ip_header_len;
    out[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let mut sum = Sum16BitWords::new().add_slice(l.addrs()).add_2bytes([0, 6]);
    sum = if l.v4 {
        sum.add_2bytes((seg_len as u16).to_be_bytes())
    } else {
        sum.add_4bytes((seg_len as u32).to_be_bytes())
    };
    let c = sum.add_slice(&out[t..]).ones_complement();
    // A computed checksum of 0 is sent as all ones (RFC 768 style; TCP
    // receivers accept either, and etherparse does the same).
    let c = if c == 0 { 0xffff } else { c };
    out[t + 16..t + 18].copy_from_slice(&c.to_ne_bytes());
}

/// Append the marker option and put `token` before the payload.
pub fn attach(pkt: &[u8], token: &[u8]) -> Result<Vec<u8>, PacketError> {
    let l = layout(pkt)?;
    if token.len() > u16::MAX as usize || l.end + token.len() + MARKER_LEN > u16::MAX as usize {
        return Err(PacketError::TokenTooLarge(token.len()));
    }
    if l.tcp_header_len + MARKER_LEN > MAX_TCP_HEADER {
        return Err(PacketError::NoRoom(l.tcp_header_len - 20));
    }
    let t = l.ip_header_len;
    let th = t + l.tcp_header_len;
    let mut out = Vec::with_capacity(l.end + MARKER_LEN + token.len());
    out.extend_from_slice(&pkt[..th]);
    let len = (token.len() as u16).to_be_bytes();
    let id = EXPERIMENT_ID.to_be_bytes();
    out.extend_from_slice(&[OPTION_KIND, 6, id[0], id[1], len[0], len[1], 1, 1]);
    out.extend_from_slice(token);
    out.extend_from_slice(&pkt[th..l.end]);
    let offset = ((l.tcp_header_len + MARKER_LEN) / 4) as u8;
    out[t + 12] = (offset << 4) | (out[t + 12] & 0x0f);
    fix(&mut out, &l);
    Ok(out)
}

/// A received packet taken apart: the token and the packet as it was
/// before the sender attached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripped {
    pub token: Vec<u8>,
    pub packet: Vec<u8>,
}

/// If the packet carries our marker, the token and the packet without it.
/// `Ok(None)`: no marker (a peer that does not enforce).
pub fn strip(pkt: &[u8]) -> Result<Option<Stripped>, PacketError> {
    let l = layout(pkt)?;
    let t = l.ip_header_len;
    let th = t + l.tcp_header_len;
    if l.tcp_header_len < 20 + MARKER_LEN {
        return Ok(None);
    }
    let m = &pkt[th - MARKER_LEN..th];
    let id = EXPERIMENT_ID.to_be_bytes();
    if m[..4] != [OPTION_KIND, 6, id[0], id[1]] || m[6..] != [1, 1] {
        return Ok(None);
    }
    let n = u16::from_be_bytes([m[4], m[5]]) as usize;
    let available = l.end - th;
    if n > available {
        return Err(PacketError::BadMarker {
            announced: n,
            available,
        });
    }
    let token = pkt[th..th + n].to_vec();
    let mut out = Vec::with_capacity(l.end - MARKER_LEN - n);
    out.extend_from_slice(&pkt[..th - MARKER_LEN]);
    out.extend_from_slice(&pkt[th + n..l.end]);
    let offset = ((l.tcp_header_len - MARKER_LEN) / 4) as u8;
    out[t + 12] = (offset << 4) | (out[t + 12] & 0x0f);
    fix(&mut out, &l);
    Ok(Some(Stripped { token, packet: out }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpHeaders, PacketBuilder, TcpHeader};
    use proptest::prelude::*;

    fn checksums_valid(pkt: &[u8]) -> bool {
        let (ip, payload) = IpHeaders::from_slice(pkt).unwrap();
        let (tcp, data) = TcpHeader::from_slice(payload.payload).unwrap();
        match &ip {
            IpHeaders::Ipv4(h, _) => {
                h.header_checksum == h.calc_header_checksum()
                    && tcp.checksum == tcp.calc_checksum_ipv4(h, data).unwrap()
            }
            IpHeaders::Ipv6(h, _) => tcp.checksum == tcp.calc_checksum_ipv6(h, data).unwrap(),
        }
    }

    fn packet(v6: bool, opts: &[u8], payload: &[u8], syn: bool) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6(
                [0xfd; 16],
                [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
        } else {
            PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        };
        let mut b = b.tcp(40000, 80, 12345, 64240);
        if syn {
            b = b.syn();
        }
        let b = b.options_raw(opts).unwrap();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// A Linux SYN's options: MSS, SACK permitted, timestamps, NOP, window scale.
    const LINUX_SYN: [u8; 20] = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    #[test]
    fn round_trip_linux_syn_v4_and_v6() {
        for v6 in [false, true] {
            let p = packet(v6, &LINUX_SYN, &[], true);
            let token = b"\x01\x01\x00\x00a token";
            let with = attach(&p, token).unwrap();
            assert!(checksums_valid(&with));
            assert_eq!(with.len(), p.len() + MARKER_LEN + token.len());
            let s = strip(&with).unwrap().unwrap();
            assert_eq!(s.token, token);
            assert_eq!(s.packet, p);
            assert_eq!(strip(&p).unwrap(), None);
        }
    }

    #[test]
    fn refusals() {
        let full = packet(false, &[1; 36], &[], true);
        assert_eq!(attach(&full, b"x"), Err(PacketError::NoRoom(36)));
        assert!(matches!(strip(&[0x45, 0, 0]), Err(PacketError::Ip(_))));
        let mut udp = Vec::new();
        PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .unwrap();
        assert_eq!(strip(&udp), Err(PacketError::NotTcp));
        // A marker announcing more token bytes than there are.
        let p = packet(false, &LINUX_SYN, &[], true);
        let mut with = attach(&p, b"12345").unwrap();
        let mlen = 20 + 20 + LINUX_SYN.len();
        with[mlen + 4..mlen + 6].copy_from_slice(&[0, 200]);
        assert!(matches!(strip(&with), Err(PacketError::BadMarker { .. })));
        let counters: std::collections::BTreeSet<_> = [
            PacketError::Ip(String::new()),
            PacketError::NotTcp,
            PacketError::Fragmented,
            PacketError::Tcp(String::new()),
            PacketError::NoRoom(0),
            PacketError::TokenTooLarge(0),
            PacketError::BadMarker {
                announced: 0,
                available: 0,
            },
        ]
        .iter()
        .map(|e| e.counter())
        .collect();
        assert_eq!(counters.len(), 7);
    }

    /// The headers' length comes from where the TCP segment starts, so IPv4
    /// options and IPv6 extension headers must count, and link-layer
    /// padding after the IP packet must not.
    #[test]
    fn ip_options_extension_headers_and_link_padding_pass_through() {
        // IPv4 with four bytes of options (NOP, NOP, NOP, end of list).
        let mut v4 = packet(false, &LINUX_SYN, b"data", true);
        v4.splice(20..20, [1, 1, 1, 0]);
        v4[0] = 0x46;
        let total = (v4.len() as u16).to_be_bytes();
        v4[2..4].copy_from_slice(&total);
        v4[10..12].copy_from_slice(&[0, 0]);
        let sum = Sum16BitWords::new().add_slice(&v4[..24]).ones_complement();
        v4[10..12].copy_from_slice(&sum.to_ne_bytes());
        // IPv6 with a hop-by-hop header (one PadN option) before TCP.
        let mut v6 = packet(true, &LINUX_SYN, b"data", true);
        v6.splice(40..40, [6, 0, 1, 4, 0, 0, 0, 0]);
        v6[6] = 0;
        let len = ((v6.len() - 40) as u16).to_be_bytes();
        v6[4..6].copy_from_slice(&len);
        for p in [v4, v6] {
            assert!(checksums_valid(&p));
            let m = tcp_meta(&p).unwrap();
            assert_eq!(
                (m.src.port(), m.dst.port(), m.flags, m.payload_len),
                (40000, 80, SYN, 4)
            );
            let mut padded = p.clone();
            padded.extend_from_slice(&[0; 6]);
            assert_eq!(tcp_meta(&padded).unwrap(), m);
            let with = attach(&padded, b"token").unwrap();
            assert!(checksums_valid(&with));
            let s = strip(&with).unwrap().unwrap();
            assert_eq!(s.token, b"token");
            assert_eq!(s.packet, p);
        }
        // An IPv4 header announcing TCP with no segment at all.
        let mut empty = packet(false, &[], &[], true)[..20].to_vec();
        empty[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert!(matches!(tcp_meta(&empty), Err(PacketError::Tcp(_))));
        assert!(matches!(strip(&empty), Err(PacketError::Tcp(_))));
    }

    proptest! {
        /// strip(attach(p)) == p for valid packets of both families, any
        /// options that leave room, any payload and any token.
        #[test]
        fn strip_undoes_attach(
            v6 in any::<bool>(),
            opt_words in 0usize..=8,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            token in proptest::collection::vec(any::<u8>(), 0..700),
            syn in any::<bool>(),
        ) {
            // Options of 4 * opt_words bytes: a prefix of a Linux SYN's, NOP-padded.
            let mut opts: Vec<u8> = LINUX_SYN.iter().copied().take(opt_words * 4).collect();
            opts.resize(opt_words * 4, 1);
            let p = packet(v6, &opts, &payload, syn);
            let with = attach(&p, &token).unwrap();
            prop_assert!(checksums_valid(&with));
            let s = strip(&with).unwrap().unwrap();
            prop_assert_eq!(s.token, token);
            prop_assert_eq!(s.packet, p);
        }

        /// Arbitrary bytes never panic either function.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = strip(&bytes);
            let _ = attach(&bytes, b"tok");
        }
    }
}
