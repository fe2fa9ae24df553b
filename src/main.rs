use clap::Parser;

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
