fn main() -> std::process::ExitCode {
    wasnap::cli_main()
}
