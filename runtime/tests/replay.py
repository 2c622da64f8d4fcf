"""Capture a handshake SYN on the lab bridge, then replay or tamper with it.

Run inside the lab's bridge namespace with Debian's python3-scapy:
  replay.py capture OUT.pcap IFACE READY_FILE   (exits after one SYN carrying a token)
  replay.py replay  IN.pcap  IFACE              (re-send it byte for byte)
  replay.py tamper  IN.pcap  IFACE              (new source port, one token byte flipped)
"""
import sys

from scapy.all import IP, IPv6, TCP, Ether, rdpcap, sendp, sniff, wrpcap


def syn_with_payload(p):
    return TCP in p and (p[TCP].flags & 0x12) == 0x02 and len(bytes(p[TCP].payload)) > 0


def main():
    mode, path, iface = sys.argv[1:4]
    if mode == "capture":
        ready = sys.argv[4]
        got = sniff(
            iface=iface,
            lfilter=syn_with_payload,
            count=1,
            timeout=30,
            started_callback=lambda: open(ready, "w").close(),
        )
        wrpcap(path, got)
        return
    p = rdpcap(path)[0]
    if mode == "tamper":
        ip = IP if IP in p else IPv6
        p[TCP].sport = (p[TCP].sport + 1000) % 65536
        raw = bytearray(bytes(p[TCP].payload))
        raw[len(raw) // 2] ^= 0x01
        p[TCP].remove_payload()
        p = p / bytes(raw)
        del p[TCP].chksum
        if ip is IP:
            del p[IP].chksum
            del p[IP].len
        else:
            del p[IPv6].plen
        p = Ether(bytes(p))
    sendp(p, iface=iface, verbose=False)


main()
