#![allow(clippy::unwrap_used)]

//! End-to-end tests of the `portmesh` binary Cargo already built: real processes, real sockets,
//! real sled files. Each test gets its own `PORTMESH_HOME`, so tests never share a node.

mod support;

mod bad_input;
mod cluster;
mod dashboard;
mod docker;
mod embedded;
mod fixtures;
mod flask;
mod k8s;
mod leases;
mod membership;
mod observe;
mod probe;
mod python;
mod registry;
mod serve;
mod tls;
mod upgrade;
mod watch;
mod workflow;
