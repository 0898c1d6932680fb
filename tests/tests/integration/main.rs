//! End-to-end tests: real `edgesync-agent` and `edgesync-hub` processes on loopback, a PLC
//! simulator (or pymodbus), a throwaway SPIFFE trust domain, a local app over MQTT.

mod api_access;
mod durability;
mod e2e;
mod events;
mod faults;
mod hostile;
mod hub_restart;
mod identity;
mod local;
mod modbus;
mod outbox;
mod rules;
mod support;
mod twin;
