//! End-to-end tests: real `edgesync-agent` and `edgesync-hub` processes on loopback, a PLC
//! simulator, a throwaway SPIFFE trust domain.

mod e2e;
mod modbus;
mod twin;
