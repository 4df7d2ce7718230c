//! One integration-test binary: the real `tope-ota` against loopback servers.

mod support;

mod api;
mod arm32;
mod busy;
mod contract;
mod delta;
mod download;
mod faults;
mod heal;
mod health;
mod install;
mod layout;
mod links;
mod openapi;
mod schema;
mod selfupdate;
mod serve;
mod setup;
mod status;
mod updater;

mod bench;
mod bench_delta;
mod deploy;
mod docs;
