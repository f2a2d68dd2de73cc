//! Fuzz target `domain_xml`: see passthroughd_testkit::fuzz.
fn main() {
    let target = passthroughd_testkit::fuzz::target("domain_xml").expect("a known target");
    afl::fuzz!(|data: &[u8]| target(data));
}
