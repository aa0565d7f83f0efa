fn main() -> std::process::ExitCode {
    wasnap::cli::main()
}
