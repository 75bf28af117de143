//! The `chat-router` binary: the servers' shared start-up (`chat_server::binary`) around
//! [`chat_router::run`].

fn main() -> std::process::ExitCode {
    chat_server::binary::main::<chat_router::config::Config>()
}
