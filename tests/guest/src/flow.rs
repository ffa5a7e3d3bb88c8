//! Which queue pair a frame leaves on: every frame of one TCP or UDP flow on the same
//! pair, so a connection stays in order while connections spread over the pairs.

/// Which of `pairs` a frame belongs on: by the ports of TCP and UDP over IPv4, else 0.
pub fn flow_pair(frame: &[u8], pairs: usize) -> usize {
    if pairs < 2 || frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return 0;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let proto = frame[23];
    let ports = 14 + ihl;
    if !(proto == 6 || proto == 17) || frame.len() < ports + 4 {
        return 0;
    }
    let src = u16::from_be_bytes([frame[ports], frame[ports + 1]]);
    let dst = u16::from_be_bytes([frame[ports + 2], frame[ports + 3]]);
    usize::from(src ^ dst) % pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(proto: u8, src: u16, dst: u16) -> [u8; 60] {
        let mut f = [0u8; 60];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = proto;
        f[34..36].copy_from_slice(&src.to_be_bytes());
        f[36..38].copy_from_slice(&dst.to_be_bytes());
        f
    }

    #[test]
    fn flows_keep_their_pair_and_spread() {
        let a = ipv4(6, 40000, 7);
        assert_eq!(flow_pair(&a, 4), flow_pair(&a, 4));
        // The reverse direction of a flow hashes the same.
        assert_eq!(flow_pair(&ipv4(6, 7, 40000), 4), flow_pair(&a, 4));
        let pairs: std::collections::BTreeSet<usize> = (0..16)
            .map(|p| flow_pair(&ipv4(17, 50000 + p, 5003), 4))
            .collect();
        assert_eq!(pairs.len(), 4);
        // ARP, ICMP, short frames and one pair: pair 0.
        let mut arp = a;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flow_pair(&arp, 4), 0);
        assert_eq!(flow_pair(&ipv4(1, 1, 2), 4), 0);
        assert_eq!(flow_pair(&a[..20], 4), 0);
        assert_eq!(flow_pair(&a, 1), 0);
    }
}
