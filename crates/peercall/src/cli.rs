//! The commands that ask a running node: `peercall lookup`, `peercall status`,
//! `peercall contacts` and `peercall page`.
//!
//! They find the node through its data directory (`--data-dir`, else the
//! `data_dir` of `--config` and the `PEERCALL_*` environment, else the default):
//! `admin.addr` says where its admin API listens (the node writes it when ready and
//! removes it at exit), `admin.token` holds the bearer token (readable only by the
//! node's user). Errors say what is wrong in words: no node running, the user not
//! found, a timeout.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::admin::{self, AddedBody, ContactsBody, LookupBody, StatusBody};
use crate::book::ContactView;
use crate::client::{self, ClientError, Response};
use crate::config::{self, Flags, Sources};
use crate::logging::short_key;
use crate::store::{ADMIN_ADDR_FILE, ADMIN_TOKEN_FILE};

/// Timeout of quick requests (status, contact lists): the node answers in
/// milliseconds, or says its engine is stuck after two seconds.
const QUICK: Duration = Duration::from_secs(5);
/// Timeout of requests that wait for the directory: the node's own lookup limit
/// (eight seconds) plus slack.
const DIRECTORY: Duration = Duration::from_secs(15);

/// How to find the node to ask.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeRef {
    /// The node's data directory (default: `data_dir` from --config and the
    /// PEERCALL_* environment, else $XDG_DATA_HOME/peercall).
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// The node's config file, to find its data directory.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// Arguments of `peercall lookup`.
#[derive(Debug, Clone, clap::Args)]
pub struct LookupArgs {
    /// A handle (such as `alice`) or a user id (52 base32 characters).
    #[arg(value_name = "HANDLE|USER_ID")]
    pub query: String,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub node: NodeRef,
}

/// Arguments of `peercall status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub node: NodeRef,
}

/// Arguments of `peercall contacts`.
#[derive(Debug, Clone, clap::Args)]
pub struct ContactsArgs {
    #[command(subcommand)]
    pub action: ContactsAction,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub node: NodeRef,
}

/// Arguments of `peercall page`.
#[derive(Debug, Clone, clap::Args)]
pub struct PageArgs {
    #[command(flatten)]
    pub node: NodeRef,
}

/// What to do with the contacts.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ContactsAction {
    /// List the contacts with their presence.
    List,
    /// Add a contact by handle (looked up now; the user id found is pinned) or by
    /// user id.
    Add {
        /// A handle or a user id.
        #[arg(value_name = "HANDLE|USER_ID")]
        contact: String,
    },
    /// Remove a contact, by the handle it was added under or its user id.
    Remove {
        /// A handle or a user id.
        #[arg(value_name = "HANDLE|USER_ID")]
        contact: String,
    },
}

/// A running node's admin API.
pub(crate) struct NodeApi {
    dir: PathBuf,
    addr: SocketAddr,
    token: String,
}

impl NodeApi {
    /// Finds the node through its data directory.
    pub(crate) fn find(node: &NodeRef) -> anyhow::Result<NodeApi> {
        let dir = match &node.data_dir {
            Some(d) => d.clone(),
            None => {
                let flags = Flags::default();
                config::load(&Sources::from_process(node.config.clone(), flags))
                    .context("cannot tell which data directory the node uses")?
                    .data_dir
            }
        };
        let addr_file = dir.join(ADMIN_ADDR_FILE);
        let text = match std::fs::read_to_string(&addr_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no peercall node is running on {} (it has no {ADMIN_ADDR_FILE}); start one \
                 with `peercall node`, or name its data directory with --data-dir",
                dir.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", addr_file.display()));
            }
        };
        let addr: SocketAddr = text
            .trim()
            .parse()
            .with_context(|| format!("{} holds no socket address", addr_file.display()))?;
        let token_file = dir.join(ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| {
                format!(
                    "cannot read the node's admin token {} (run as the node's user)",
                    token_file.display()
                )
            })?
            .trim()
            .to_owned();
        Ok(NodeApi { dir, addr, token })
    }

    /// The admin address and bearer token.
    pub(crate) fn endpoint(&self) -> (SocketAddr, &str) {
        (self.addr, &self.token)
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Response> {
        client::request(self.addr, method, path, Some(&self.token), body, timeout)
            .await
            .map_err(|e| match e {
                ClientError::Connect { .. } => anyhow!(
                    "the node on {} does not answer at {} (it may have crashed and left a \
                     stale {ADMIN_ADDR_FILE}): {e}",
                    self.dir.display(),
                    self.addr
                ),
                ClientError::Timeout { .. } => anyhow!("the node did not answer in time: {e}"),
                e => anyhow!(e),
            })
    }

    /// A request whose 2xx body parses as `T`; an error in words otherwise.
    pub(crate) async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<(T, String)> {
        let r = self.call(method, path, body, timeout).await?;
        if !r.is_success() {
            bail!("{}", explain(&r));
        }
        let value = serde_json::from_str(&r.body)
            .with_context(|| format!("unexpected answer to {method} {path}: {}", r.body))?;
        Ok((value, r.body))
    }
}

/// An error response in words.
pub(crate) fn explain(r: &Response) -> String {
    let message = r.error_message();
    match r.status {
        404 => format!("not found: {message}"),
        504 => format!("timed out: {message}"),
        401 => format!("the node refused the admin token: {message}"),
        _ => message,
    }
}

pub(crate) fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(f)
}

/// Pretty JSON of an API body, for `--json`.
fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| body.to_owned())
}

/// Runs `peercall lookup`.
pub fn lookup(args: LookupArgs) -> anyhow::Result<()> {
    // Checked here too, so a typo fails without a node and with the reason.
    admin::parse_query(&args.query).map_err(|e| anyhow!(e))?;
    let api = NodeApi::find(&args.node)?;
    block_on(async move {
        // Handles and base32 ids need no URL escaping.
        let path = format!("/v1/lookup?q={}", args.query.trim());
        let (body, raw): (LookupBody, String) = api.json("GET", &path, None, DIRECTORY).await?;
        if args.json {
            println!("{}", pretty(&raw));
        } else {
            print!("{}", format_lookup(&body));
        }
        Ok(())
    })
}

fn format_lookup(r: &LookupBody) -> String {
    let mut out = String::new();
    let state = if r.online { "online" } else { "offline" };
    let name = r.handle.as_deref().unwrap_or("(no handle)");
    let _ = writeln!(out, "{name} ({state})");
    let _ = writeln!(out, "  fingerprint      {}", r.fingerprint);
    let _ = writeln!(out, "  user id          {}", r.user_id);
    let _ = writeln!(out, "  static key       {}", r.static_key);
    let endpoints = if r.endpoints.is_empty() {
        "none".to_owned()
    } else {
        r.endpoints.join(", ")
    };
    let _ = writeln!(out, "  endpoints        {endpoints}");
    let homes = if r.home_supernodes.is_empty() {
        "none".to_owned()
    } else {
        r.home_supernodes
            .iter()
            .map(|h| format!("{}@{}", short(&h.key), h.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "  home supernodes  {homes}");
    let _ = writeln!(
        out,
        "  record           seq {}, expires in {} s",
        r.seq, r.expires_in_s
    );
    out
}

/// A key's first characters, as logs show them.
fn short(key: &str) -> String {
    key.parse()
        .map(|k| short_key(&k))
        .unwrap_or_else(|_| key.to_owned())
}

/// Runs `peercall page`: prints a link to the node's call page that signs the
/// browser in, the admin token in the URL fragment (which browsers never send to
/// a server; the page takes it out of the address bar at once).
pub fn page(args: PageArgs) -> anyhow::Result<()> {
    let api = NodeApi::find(&args.node)?;
    block_on(async {
        let r = api.call("GET", "/", None, QUICK).await?;
        if !r.is_success() {
            bail!("the node does not serve its page: {}", explain(&r));
        }
        println!("{}", page_link(api.addr, &api.token));
        eprintln!(
            "Open it in a browser on this machine. The link holds the node's admin token: \
             do not share it."
        );
        Ok(())
    })
}

/// The signed-in link to the page of the node at `addr`.
fn page_link(addr: SocketAddr, token: &str) -> String {
    format!("http://{addr}/#token={token}")
}

/// Runs `peercall status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let api = NodeApi::find(&args.node)?;
    block_on(async move {
        let (body, raw): (StatusBody, String) = api.json("GET", "/status", None, QUICK).await?;
        if args.json {
            println!("{}", pretty(&raw));
        } else {
            print!("{}", format_status(&body));
        }
        Ok(())
    })
}

fn format_status(s: &StatusBody) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "fingerprint  {}", s.fingerprint);
    let _ = writeln!(out, "user id      {}", s.user_id);
    let _ = writeln!(
        out,
        "handle       {}",
        s.handle.as_deref().unwrap_or("(none)")
    );
    let what = match (s.role.as_str(), s.supernode) {
        ("supernode", _) => "supernode (pinned: a seed, never demoted)",
        (_, true) => "supernode (promoted by the tier)",
        ("ordinary", false) => "ordinary node (refuses promotion)",
        (_, false) => "ordinary node (may be promoted)",
    };
    let _ = writeln!(out, "role         {} — {what}", s.role);
    if s.supernode {
        let _ = writeln!(
            out,
            "clients      {} attached of {} admitted at most",
            s.clients, s.capacity
        );
        let _ = writeln!(out, "tier         {} live supernodes", s.members);
        let _ = writeln!(
            out,
            "directory    {} records stored (this supernode's share)",
            s.records
        );
    } else {
        let homes = if s.homes.is_empty() {
            "none yet (attaching)".to_owned()
        } else {
            s.homes
                .iter()
                .map(|h| format!("{}@{}", short(&h.key), h.addr))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "homes        {homes}");
    }
    let _ = writeln!(out, "udp          {}", s.udp);
    let _ = writeln!(
        out,
        "reflexive    {}",
        s.reflexive.as_deref().unwrap_or("unknown yet")
    );
    let _ = writeln!(out, "sessions     {}", s.sessions.len());
    let _ = writeln!(
        out,
        "contacts     {} ({} online)",
        s.contacts, s.contacts_online
    );
    let _ = writeln!(out, "host cache   {} supernodes", s.host_cache);
    let _ = writeln!(out, "uptime       {} s", s.uptime_s);
    out
}

/// Runs `peercall contacts`.
pub fn contacts(args: ContactsArgs) -> anyhow::Result<()> {
    if let ContactsAction::Add { contact } | ContactsAction::Remove { contact } = &args.action {
        admin::parse_query(contact).map_err(|e| anyhow!(e))?;
    }
    let api = NodeApi::find(&args.node)?;
    block_on(async move {
        match &args.action {
            ContactsAction::List => {
                let (body, raw): (ContactsBody, String) =
                    api.json("GET", "/v1/contacts", None, QUICK).await?;
                if args.json {
                    println!("{}", pretty(&raw));
                } else {
                    print!("{}", format_contacts(&body.contacts));
                }
            }
            ContactsAction::Add { contact } => {
                let request = serde_json::json!({ "contact": contact.trim() }).to_string();
                let (body, raw): (AddedBody, String) = api
                    .json("POST", "/v1/contacts", Some(&request), DIRECTORY)
                    .await?;
                if args.json {
                    println!("{}", pretty(&raw));
                } else {
                    let c = &body.contact;
                    let verb = if body.added {
                        "added"
                    } else {
                        "already a contact:"
                    };
                    println!(
                        "{verb} {} — fingerprint {} (pinned user id {})",
                        c.handle.as_deref().unwrap_or("(no handle)"),
                        c.fingerprint,
                        c.user_id
                    );
                }
            }
            ContactsAction::Remove { contact } => {
                let path = format!("/v1/contacts/{}", contact.trim());
                let (body, raw): (serde_json::Value, String) =
                    api.json("DELETE", &path, None, QUICK).await?;
                if args.json {
                    println!("{}", pretty(&raw));
                } else {
                    let fp = body["removed"]["fingerprint"].as_str().unwrap_or("?");
                    println!("removed {} — fingerprint {fp}", contact.trim());
                }
            }
        }
        Ok(())
    })
}

fn format_contacts(contacts: &[ContactView]) -> String {
    if contacts.is_empty() {
        return "no contacts; add one with `peercall contacts add HANDLE`\n".to_owned();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<24} {:<8} {:>8}  endpoints",
        "handle", "fingerprint", "state", "since"
    );
    for c in contacts {
        let state = match c.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "unknown",
        };
        let since = c
            .since_s
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<8} {:>8}  {}",
            c.handle.as_deref().unwrap_or("-"),
            c.fingerprint,
            state,
            since,
            c.endpoints.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::HomeBody;

    #[test]
    fn lookups_print_fingerprint_endpoints_and_homes() {
        let key = "a".repeat(52);
        let body = LookupBody {
            query: "alice".into(),
            user_id: "b".repeat(52),
            fingerprint: "bbbb-bbbb-bbbb-bbbb-bbbb".into(),
            handle: Some("alice".into()),
            static_key: key.clone(),
            online: true,
            endpoints: vec!["127.0.0.1:4000".into(), "10.0.0.2:4000".into()],
            home_supernodes: vec![HomeBody {
                key: key.clone(),
                addr: "127.0.0.1:7600".into(),
            }],
            seq: 9,
            expires: 100,
            expires_in_s: 42,
        };
        let text = format_lookup(&body);
        assert!(text.starts_with("alice (online)\n"), "{text}");
        assert!(text.contains("bbbb-bbbb-bbbb-bbbb-bbbb"));
        assert!(text.contains("127.0.0.1:4000, 10.0.0.2:4000"));
        assert!(text.contains("aaaaaaaa@127.0.0.1:7600"), "{text}");
        assert!(text.contains("expires in 42 s"));
    }

    #[test]
    fn errors_are_put_in_words() {
        let r = |status, body: &str| Response {
            status,
            body: body.into(),
        };
        assert_eq!(
            explain(&r(404, "{\"error\":\"\\\"bob\\\" was not found\"}")),
            "not found: \"bob\" was not found"
        );
        assert!(explain(&r(504, "{\"error\":\"slow\"}")).starts_with("timed out"));
        assert_eq!(explain(&r(500, "plain")), "plain");
    }

    #[test]
    fn no_node_running_is_said_plainly() {
        let tmp = tempfile::tempdir().unwrap();
        let node = NodeRef {
            data_dir: Some(tmp.path().to_owned()),
            config: None,
        };
        let err = NodeApi::find(&node).err().unwrap().to_string();
        assert!(err.contains("no peercall node is running"), "{err}");
    }
}
