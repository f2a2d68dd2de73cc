//! Fuzz target `address`: see passthroughd_testkit::fuzz.
fn main() {
    let target = passthroughd_testkit::fuzz::target("address").expect("a known target");
    afl::fuzz!(|data: &[u8]| target(data));
}
