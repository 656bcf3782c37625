fn main() -> std::process::ExitCode {
    aws_cni::cli::main()
}
