//! Every endpoint's body parser on arbitrary bytes: the first byte picks the endpoint, the
//! rest is the body. An action or a 4xx error, never a panic or a 5xx.
#![no_main]

use api::routes::ROUTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let (_, _, endpoint) = ROUTES[usize::from(pick) % ROUTES.len()];
    if let Err(e) = api::server::action_for(endpoint, body, Vec::new()) {
        assert!((400..500).contains(&e.status), "{endpoint:?}: {e:?}");
    }
});
