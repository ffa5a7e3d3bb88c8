//! The route table: which endpoint a method and path name, and the answer for the rest
//! (404 for an unknown path, 405 for a known path with the wrong method).

/// The API path prefix.
pub const PREFIX: &str = "/api/v1/";

/// An endpoint of baton's API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET vmm.ping`
    VmmPing,
    /// `PUT vmm.shutdown`
    VmmShutdown,
    /// `GET vmm.backend-transfer-support`
    VmmBackendTransferSupport,
    /// `PUT vmm.live-upgrade`
    VmmLiveUpgrade,
    /// `PUT vm.create`
    VmCreate,
    /// `PUT vm.boot`
    VmBoot,
    /// `GET vm.info`
    VmInfo,
    /// `GET vm.counters`
    VmCounters,
    /// `PUT vm.add-net`
    VmAddNet,
    /// `PUT vm.add-disk`
    VmAddDisk,
    /// `PUT vm.remove-device`
    VmRemoveDevice,
    /// A Cloud Hypervisor endpoint baton does not implement, by name.
    NotSupported(&'static str),
    /// `PUT vm.pause`
    VmPause,
    /// `PUT vm.resume`
    VmResume,
    /// `PUT vm.shutdown`
    VmShutdown,
    /// `PUT vm.reboot`
    VmReboot,
    /// `PUT vm.power-button`
    VmPowerButton,
    /// `PUT vm.delete`
    VmDelete,
    /// `PUT vm.snapshot`
    VmSnapshot,
    /// `PUT vm.restore`
    VmRestore,
    /// `PUT vm.send-migration`
    VmSendMigration,
    /// `PUT vm.receive-migration`
    VmReceiveMigration,
}

/// Every route: (name under [`PREFIX`], method, endpoint).
pub const ROUTES: &[(&str, &str, Endpoint)] = &[
    ("vmm.ping", "GET", Endpoint::VmmPing),
    ("vmm.shutdown", "PUT", Endpoint::VmmShutdown),
    (
        "vmm.backend-transfer-support",
        "GET",
        Endpoint::VmmBackendTransferSupport,
    ),
    ("vmm.live-upgrade", "PUT", Endpoint::VmmLiveUpgrade),
    ("vm.create", "PUT", Endpoint::VmCreate),
    ("vm.boot", "PUT", Endpoint::VmBoot),
    ("vm.info", "GET", Endpoint::VmInfo),
    ("vm.counters", "GET", Endpoint::VmCounters),
    ("vm.add-net", "PUT", Endpoint::VmAddNet),
    ("vm.add-disk", "PUT", Endpoint::VmAddDisk),
    ("vm.remove-device", "PUT", Endpoint::VmRemoveDevice),
    ("vm.pause", "PUT", Endpoint::VmPause),
    ("vm.resume", "PUT", Endpoint::VmResume),
    ("vm.shutdown", "PUT", Endpoint::VmShutdown),
    ("vm.reboot", "PUT", Endpoint::VmReboot),
    ("vm.power-button", "PUT", Endpoint::VmPowerButton),
    ("vm.delete", "PUT", Endpoint::VmDelete),
    ("vm.snapshot", "PUT", Endpoint::VmSnapshot),
    ("vm.restore", "PUT", Endpoint::VmRestore),
    ("vm.send-migration", "PUT", Endpoint::VmSendMigration),
    ("vm.receive-migration", "PUT", Endpoint::VmReceiveMigration),
];

/// Cloud Hypervisor's endpoints that baton does not implement: they answer 501 with a
/// message saying so, not 404.
pub const NOT_SUPPORTED: &[(&str, &str, &str)] = &[
    (
        "vm.add-device",
        "PUT",
        "baton has no VFIO device passthrough",
    ),
    (
        "vm.add-user-device",
        "PUT",
        "baton has no vfio-user devices",
    ),
    ("vm.add-fs", "PUT", "baton has no virtio-fs"),
    (
        "vm.add-generic-vhost-user",
        "PUT",
        "baton has no vhost-user devices",
    ),
    ("vm.add-pmem", "PUT", "baton has no virtio-pmem"),
    ("vm.add-vdpa", "PUT", "baton has no vDPA devices"),
    ("vm.add-vsock", "PUT", "baton has no virtio-vsock"),
    (
        "vm.resize",
        "PUT",
        "baton cannot resize vCPUs or memory of a VM",
    ),
    (
        "vm.resize-disk",
        "PUT",
        "baton cannot resize a disk of a VM",
    ),
    ("vm.resize-zone", "PUT", "baton has no memory zones"),
    ("vm.nmi", "PUT", "baton cannot inject an NMI yet"),
    ("vm.coredump", "PUT", "baton cannot write guest core dumps"),
];

/// Why a request matches no route.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No endpoint at this path.
    #[error("Unknown API path {0}")]
    NotFound(String),
    /// The endpoint exists but not with this method.
    #[error("Method {method} not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        /// The method sent.
        method: String,
        /// The path.
        path: String,
        /// The method the endpoint takes.
        allowed: &'static str,
    },
}

impl RouteError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::MethodNotAllowed { .. } => 405,
        }
    }
}

/// The endpoint for `method` on `path`.
pub fn route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
    let name = path
        .strip_prefix(PREFIX)
        .ok_or_else(|| RouteError::NotFound(path.to_string()))?;
    let (allowed, endpoint) = match ROUTES.iter().find(|(n, _, _)| *n == name) {
        Some((_, allowed, endpoint)) => (*allowed, *endpoint),
        None => NOT_SUPPORTED
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, allowed, why)| (*allowed, Endpoint::NotSupported(why)))
            .ok_or_else(|| RouteError::NotFound(path.to_string()))?,
    };
    if allowed != method {
        return Err(RouteError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed,
        });
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_routes() {
        assert_eq!(route("GET", "/api/v1/vmm.ping"), Ok(Endpoint::VmmPing));
        assert_eq!(route("PUT", "/api/v1/vm.create"), Ok(Endpoint::VmCreate));
        assert_eq!(
            route("PUT", "/api/v1/vm.power-button"),
            Ok(Endpoint::VmPowerButton)
        );
        for (name, method, endpoint) in ROUTES {
            assert_eq!(route(method, &format!("{PREFIX}{name}")), Ok(*endpoint));
        }
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_405() {
        let e = route("GET", "/api/v1/vm.teleport").unwrap_err();
        assert_eq!(e.status(), 404);
        assert_eq!(route("GET", "/vm.info").unwrap_err().status(), 404);
        assert_eq!(route("GET", "/api/v2/vm.info").unwrap_err().status(), 404);
        let e = route("PUT", "/api/v1/vm.info").unwrap_err();
        assert_eq!(e.status(), 405);
        assert!(e.to_string().contains("use GET"), "{e}");
        assert_eq!(route("GET", "/api/v1/vm.boot").unwrap_err().status(), 405);
    }

    #[test]
    fn cloud_hypervisor_endpoints_baton_lacks_are_named() {
        assert_eq!(
            route("PUT", "/api/v1/vm.add-fs"),
            Ok(Endpoint::NotSupported("baton has no virtio-fs"))
        );
        assert_eq!(route("GET", "/api/v1/vm.resize").unwrap_err().status(), 405);
    }
}
