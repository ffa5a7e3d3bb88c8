//! The API's HTTP parser and router on arbitrary bytes: an answer or an error, never a panic,
//! and a request it completes never claims more bytes than it was given.
#![no_main]

use api::http::{parse_request, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Pipelined requests, as a keep-alive connection carries them.
    while let Ok(Parsed::Complete(request, used)) = parse_request(rest) {
        assert!(used > 0 && used <= rest.len());
        let _ = api::routes::route(&request.method, &request.path);
        rest = &rest[used..];
    }
});
