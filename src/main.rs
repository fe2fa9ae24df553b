use clap::Parser;

/// mimalloc instead of the system allocator: the per-message path allocates a lot of small,
/// short-lived buffers, and glibc's per-thread arenas keep the 19 MiB Argon2 buffers of login
/// bursts resident long after they are freed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    match kefu::cli::Cli::parse().run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kefu: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
