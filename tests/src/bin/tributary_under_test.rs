//! The gateway's `main`, built inside the test crate so end-to-end tests can run it as a child.

fn main() -> std::process::ExitCode {
    tributary_gateway::main()
}
