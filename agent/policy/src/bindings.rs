//! The host side of the `shoal:policy@0.1.0` worlds: one `bindgen!` per world, here and
//! nowhere else. The `host` and `types` interfaces are generated once (with the
//! scheduler) and shared by the other two worlds.

/// Bindings of the `scheduler` world.
pub(crate) mod scheduler {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "shoal:policy/scheduler@0.1.0",
    });
}

/// Bindings of the `scaler` world.
pub(crate) mod scaler {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "shoal:policy/scaler@0.1.0",
        with: {
            "shoal:policy/host": crate::bindings::scheduler::shoal::policy::host,
            "shoal:policy/types": crate::bindings::scheduler::shoal::policy::types,
        },
    });
}

/// Bindings of the `discovery` world.
pub(crate) mod discovery {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "shoal:policy/discovery@0.1.0",
        with: {
            "shoal:policy/host": crate::bindings::scheduler::shoal::policy::host,
            "shoal:policy/types": crate::bindings::scheduler::shoal::policy::types,
        },
    });
}
