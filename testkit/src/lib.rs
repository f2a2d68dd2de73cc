//! Test support for passthroughd, kept out of the shipped daemon: a simulated kernel that reacts
//! to sysfs writes the way a real one does ([`sim`]) and a generator of large synthetic hosts
//! ([`synthetic`]) for benchmarks and scan tests, a private D-Bus daemon ([`bus`]), and a
//! scripted VFIO ([`vfio`]).

pub mod bus;
pub mod fuzz;
pub mod sim;
pub mod synthetic;
pub mod vfio;
