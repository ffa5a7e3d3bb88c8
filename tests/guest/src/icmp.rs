//! ICMP echo messages for the guest's `ping` command (RFC 792), built and checked here so
//! the network code only moves bytes.

/// Bytes of an echo request: 8 of header and 16 of payload.
pub const ECHO_LEN: usize = 24;

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with `ident` and `seq`.
pub fn echo_request(ident: u16, seq: u16) -> [u8; ECHO_LEN] {
    let mut p = [0u8; ECHO_LEN];
    p[0] = 8;
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// `(ident, seq)` of a valid echo reply.
pub fn echo_reply(packet: &[u8]) -> Option<(u16, u16)> {
    if packet.len() < 8 || packet[0] != 0 || packet[1] != 0 || checksum(packet) != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([packet[4], packet[5]]),
        u16::from_be_bytes([packet[6], packet[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checksums_and_reply_parses() {
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0, "a valid packet sums to zero");
        // The reply is the request with type 0 and the checksum fixed up.
        let mut reply = req;
        reply[0] = 0;
        reply[2..4].copy_from_slice(&[0, 0]);
        let sum = checksum(&reply);
        reply[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(echo_reply(&reply), Some((0x1234, 7)));
        assert_eq!(echo_reply(&req), None, "a request is not a reply");
        reply[9] ^= 1;
        assert_eq!(echo_reply(&reply), None, "bad checksum");
        assert_eq!(echo_reply(&[0; 4]), None);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071, section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
