fn main() -> std::process::ExitCode {
    egress_cni::cli::main()
}
