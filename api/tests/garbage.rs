//! Hostile input for the API's parsers: random and mutated bytes must give an answer or an
//! error, never a panic. (A stand-in for coverage-guided fuzzing, which needs a nightly
//! toolchain this project cannot install; the generator is seeded, so failures replay.)

use api::http::Parsed;

use api::option_parser::OptionParser;
use api::{CpusConfig, MemoryConfig, VmConfig};

/// xorshift64*: small, seeded, good enough to spray bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `base` with a few random bytes replaced, inserted or removed.
    fn mutate(&mut self, base: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        for _ in 0..=self.below(4) {
            let pos = self.below(v.len() + 1);
            let byte = alphabet[self.below(alphabet.len())];
            match self.below(3) {
                0 if pos < v.len() => v[pos] = byte,
                1 => v.insert(pos, byte),
                _ if pos < v.len() => {
                    v.remove(pos);
                }
                _ => v.push(byte),
            }
        }
        v
    }
}

const HTTP_SEEDS: &[&[u8]] = &[
    b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"PUT /api/v1/vm.boot HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
];

#[test]
fn http_parser_survives_garbage() {
    let mut rng = Rng(0x5eed_0001);
    let alphabet = b"\r\n :GETPUT/0123456789aZ\x00\xff";
    for i in 0..20_000 {
        let input = if i % 4 == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            rng.mutate(HTTP_SEEDS[i % HTTP_SEEDS.len()], alphabet)
        };
        // Read requests until the input runs out or is rejected.
        let mut rest = input.as_slice();
        for _ in 0..4 {
            match api::http::parse_request(rest) {
                Ok(Parsed::Complete(r, used)) => {
                    assert!(r.body.len() <= api::http::MAX_BODY_BYTES);
                    assert!(used > 0 && used <= rest.len());
                    rest = &rest[used..];
                }
                Ok(_) => break,
                Err(e) => {
                    assert!((400..600).contains(&e.status()));
                    break;
                }
            }
        }
    }
}

#[test]
fn option_strings_survive_garbage() {
    let mut rng = Rng(0x5eed_0002);
    let seeds = [
        "boot=4,template=pvm,mask=[avx,cx16]",
        "size=5G,shared=on",
        "socket=\"/tmp/a,b\"",
    ];
    let alphabet = b"=,[]\"abcdGMK0159 ";
    for i in 0..20_000 {
        let input = rng.mutate(seeds[i % seeds.len()].as_bytes(), alphabet);
        let Ok(s) = String::from_utf8(input) else {
            continue;
        };
        let _ = OptionParser::parse(&s, &["boot", "size", "socket", "mask"], Some("socket"));
        let _ = CpusConfig::from_option_string(&s);
        let _ = MemoryConfig::from_option_string(&s);
        let _ = api::ConsoleConfig::from_option_string(&s);
    }
}

#[test]
fn vm_config_json_survives_garbage() {
    let mut rng = Rng(0x5eed_0003);
    let seed = br#"{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":1073741824,"shared":true},"payload":{"kernel":"/k","cmdline":"x"},"serial":{"mode":"Socket","socket":"/s"}}"#;
    let alphabet = b"{}[]\":,0123456789truefalsnul \\";
    for _ in 0..20_000 {
        let input = rng.mutate(seed, alphabet);
        if let Ok(config) = serde_json::from_slice::<VmConfig>(&input) {
            let _ = config.validate(&["avx"]);
        }
    }
}
