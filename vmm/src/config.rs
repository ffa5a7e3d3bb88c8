//! Checks of a VM configuration that come before anything is built: validation and device
//! names, and which network cards take the TAP descriptors that came with a request. Both the
//! control loop (vm.create, vm.add-*, vm.restore) and an incoming migration use them.

use api::VmConfig;

use crate::cpuid;

/// Why a configuration, or the descriptors that came with it, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("Invalid VM configuration")]
    Invalid(#[source] api::ConfigError),
    /// `net_fds` counts other descriptors than came.
    #[error("net_fds lists {wanted} descriptor(s), but {came} came with the request")]
    FdCount {
        /// Descriptors `net_fds` lists.
        wanted: usize,
        /// Descriptors that came.
        came: usize,
    },
    /// `net_fds` names a card the VM does not have.
    #[error("net_fds names '{0}', which is no network card of this VM")]
    UnknownCard(String),
    /// `net_fds` names a card twice.
    #[error("net_fds names '{0}' twice")]
    Twice(String),
}

/// Validates `config` and names its devices.
pub fn check_and_name(config: &mut VmConfig) -> Result<(), Error> {
    config
        .validate(&cpuid::feature_names())
        .and_then(|_| config.assign_device_ids())
        .map_err(Error::Invalid)
}

/// Lines up descriptors that came for network cards (`net_fds`, in the order listed) with
/// the cards of `config`: those cards take descriptors instead of opening their TAP by name,
/// in configuration order, which is how `Backends::open` hands them out.
pub fn net_fds_in_order(
    config: &mut VmConfig,
    net_fds: &[api::NetFds],
    fds: api::fds::Fds,
) -> Result<api::fds::Fds, Error> {
    let wanted: usize = net_fds.iter().map(|n| n.num_fds).sum();
    if wanted != fds.len() {
        return Err(Error::FdCount {
            wanted,
            came: fds.len(),
        });
    }
    let mut fds = fds.into_iter();
    let mut by_card: Vec<Option<api::fds::Fds>> = config.net.iter().map(|_| None).collect();
    for entry in net_fds {
        let Some(i) = config
            .net
            .iter()
            .position(|n| n.id.as_deref() == Some(entry.id.as_str()))
        else {
            return Err(Error::UnknownCard(entry.id.clone()));
        };
        if by_card[i].is_some() {
            return Err(Error::Twice(entry.id.clone()));
        }
        by_card[i] = Some(fds.by_ref().take(entry.num_fds).collect());
        config.net[i].tap = None;
    }
    Ok(by_card.into_iter().flatten().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn config(cards: &[&str]) -> VmConfig {
        let net: Vec<serde_json::Value> = cards
            .iter()
            .map(|id| serde_json::json!({"id": id, "tap": format!("tap-{id}")}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "net": net,
        }))
        .unwrap()
    }

    fn entry(id: &str, num_fds: usize) -> api::NetFds {
        serde_json::from_value(serde_json::json!({"id": id, "num_fds": num_fds})).unwrap()
    }

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect()
    }

    #[test]
    fn descriptors_go_to_the_named_cards_in_configuration_order() {
        let mut c = config(&["a", "b", "c"]);
        let given = fds(3);
        let raw: Vec<i32> = given.iter().map(|f| f.as_raw_fd()).collect();
        // Listed c first, but handed out in configuration order: b's two, then c's one.
        let out = net_fds_in_order(&mut c, &[entry("c", 1), entry("b", 2)], given).unwrap();
        let got: Vec<i32> = out.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(got, vec![raw[1], raw[2], raw[0]]);
        assert_eq!(
            c.net[0].tap.as_deref(),
            Some("tap-a"),
            "a opens its TAP by name"
        );
        assert_eq!((c.net[1].tap.as_ref(), c.net[2].tap.as_ref()), (None, None));
    }

    #[test]
    fn bad_net_fds_are_refused_with_the_reason() {
        let mut c = config(&["a"]);
        let e = net_fds_in_order(&mut c, &[entry("a", 2)], fds(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "net_fds lists 2 descriptor(s), but 1 came with the request"
        );
        let e = net_fds_in_order(&mut c, &[entry("z", 1)], fds(1)).unwrap_err();
        assert!(matches!(e, Error::UnknownCard(ref id) if id == "z"), "{e}");
        let e = net_fds_in_order(&mut c, &[entry("a", 1), entry("a", 1)], fds(2)).unwrap_err();
        assert!(matches!(e, Error::Twice(ref id) if id == "a"), "{e}");
        assert!(net_fds_in_order(&mut c, &[], fds(0)).unwrap().is_empty());
    }

    #[test]
    fn checking_names_devices_and_refuses_bad_configurations() {
        let mut c = config(&["a"]);
        c.net.push(c.net[0].clone());
        c.net[1].id = None;
        check_and_name(&mut c).unwrap();
        assert!(c.net[1].id.is_some(), "an unnamed card gets a name");
        c.net.push(c.net[0].clone());
        assert!(
            matches!(check_and_name(&mut c), Err(Error::Invalid(_))),
            "ids clash"
        );
    }
}
