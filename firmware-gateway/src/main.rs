//! The `tributary` binary: see the library for everything it does.

fn main() -> std::process::ExitCode {
    tributary_gateway::main()
}
