//! The `chat-node` binary: the servers' shared start-up (`chat_server::binary`) around
//! [`chat_node::run`].

fn main() -> std::process::ExitCode {
    chat_server::binary::main::<chat_node::config::Config>()
}
