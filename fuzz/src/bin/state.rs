//! Fuzz target `state`: see passthroughd_testkit::fuzz.
fn main() {
    let target = passthroughd_testkit::fuzz::target("state").expect("a known target");
    afl::fuzz!(|data: &[u8]| target(data));
}
