//! Fuzz target `sysfs`: see passthroughd_testkit::fuzz.
fn main() {
    let target = passthroughd_testkit::fuzz::target("sysfs").expect("a known target");
    afl::fuzz!(|data: &[u8]| target(data));
}
