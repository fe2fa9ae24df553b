use clap::Parser;

/// mimalloc instead of the system allocator: the per-message path allocates a lot of small,
/// short-lived buffers, and glibc's per-thread arenas keep the 19 MiB Argon2 buffers of login
/// bursts resident long after they are freed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    match kefu::cli::Cli::parse().run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kefu: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// mimalloc asks for transparent huge pages on the memory it commits, and where the kernel
/// grants them (`madvise` mode, Debian's default) a 2 MiB page is resident as soon as one byte
/// of it is touched. Idle connections touch a little of much memory: with huge pages each one
/// cost 28 KB of resident memory, without them 21.5 KB, at the same CPU per message
/// (docs/benchmarks.md, "Idle connections"). The flag covers the whole process, including
/// what mimalloc mapped before this call.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        // Only memory is at stake, not correctness.
        eprintln!("kefu: could not turn transparent huge pages off: {e}");
    }
}
