//! dra-apiserver-standin, as the VM test runs it: a kubeconfig, "ready <url>", then answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn the_binary_writes_a_kubeconfig_says_ready_and_serves() {
    let kubeconfig = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("standin-{}.kubeconfig", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dra-apiserver-standin"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().strip_prefix("ready ").expect(&line).to_owned();
    let written = std::fs::read_to_string(&kubeconfig).unwrap();
    let config: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(config["clusters"][0]["cluster"]["server"], url.as_str());

    let address = url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /api/v1/nodes/missing HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&kubeconfig).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains(r#""reason":"NotFound""#), "{answer}");
}
