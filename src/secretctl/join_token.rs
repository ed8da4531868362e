//! `secretctl join-token worker|manager [-q] [--rotate]`.

use clap::Args;
use swarmd_proto::control::GetJoinTokenRequest;
use tonic::transport::Channel;

use super::client::explain;

#[derive(Args, Debug)]
pub(super) struct JoinTokenArgs {
    /// worker or manager.
    #[arg(value_parser = ["worker", "manager"])]
    role: String,
    /// Print only the token.
    #[arg(short, long)]
    quiet: bool,
    /// Replace the token; the old one is refused from now on (joined nodes are unaffected).
    #[arg(long)]
    rotate: bool,
}

pub(super) async fn run(channel: Channel, a: JoinTokenArgs) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    let token = client
        .get_join_token(GetJoinTokenRequest { role: a.role.clone(), rotate: a.rotate })
        .await
        .map_err(explain)?
        .into_inner()
        .token;
    if a.quiet {
        println!("{token}");
    } else {
        if a.rotate {
            println!("Successfully rotated {} join token.\n", a.role);
        }
        println!(
            "To add a {} to this cluster, run on it:\n\n    swarmd {} join {token} --remote <this manager's address>\n",
            a.role, a.role
        );
    }
    Ok(())
}
