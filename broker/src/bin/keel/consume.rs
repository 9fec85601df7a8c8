//! `keel consume --group G`: as a stream-group member (offsets committed on exit) or a
//! queue-group member (leased deliveries, each acked, nacked or termed).

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_client::consumer::StartAt;
use keel_client::group::{GroupConsumer, StreamGroupConfig};
use keel_client::queue::{Delivery, QueueConfig, QueueConsumer};
use keel_protocol::message::{QueueStart, SettleOutcome};
use tokio::io::AsyncWriteExt;

use crate::client_cmds::{print_message, Connect, ConsumeArgs};

/// How long one poll waits before the idle and signal checks run again.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Bytes of an `--exec` command's stderr kept as the nack reason (its tail).
const EXEC_REASON_BYTES: usize = 400;

/// Tells the user (on stderr) that the consumer moved past messages retention deleted.
pub fn report_retention_skips(topic: &str, skips: Vec<keel_client::consumer::RetentionSkip>) {
    for s in skips {
        eprintln!("{topic}/{}: offsets {}..{} were deleted by retention before they were read; going on from {}", s.partition, s.from, s.to, s.to);
    }
}

/// Stream mode: read from the group's committed offsets; on exit (max, idle, Ctrl-C)
/// commit the position after the last message printed in each partition.
pub async fn stream_group(args: ConsumeArgs, connect: Connect, start: StartAt, json: bool) -> anyhow::Result<()> {
    let group = args.group.clone().expect("checked by the caller");
    let config = StreamGroupConfig { start, session_timeout: args.session_timeout, ..StreamGroupConfig::default() };
    let mut consumer = GroupConsumer::join(connect.cluster()?, &args.topic, &group, config).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut count = 0u64;
    let mut last_message = Instant::now();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    'outer: loop {
        let messages = tokio::select! {
            m = consumer.poll(POLL_WAIT) => m?,
            _ = &mut interrupted => break,
        };
        report_retention_skips(&args.topic, consumer.take_retention_skips());
        if messages.is_empty() {
            if args.idle_timeout.is_some_and(|t| last_message.elapsed() >= t) {
                break;
            }
            out.flush()?;
            continue;
        }
        last_message = Instant::now();
        for (i, m) in messages.iter().enumerate() {
            print_message(&mut out, m, json, serde_json::Map::new())?;
            count += 1;
            if args.max.is_some_and(|max| count >= max) {
                // The poll moved past messages not printed: commit only what was.
                for rest in &messages[i + 1..] {
                    let pos = consumer.positions()[rest.partition as usize];
                    if rest.offset < pos {
                        consumer.seek(rest.partition, rest.offset)?;
                    }
                }
                break 'outer;
            }
        }
    }
    out.flush()?;
    let positions: Vec<(u32, u64)> = consumer.assignment().iter().map(|p| (*p, consumer.positions()[*p as usize])).collect();
    consumer.close().await.with_context(|| format!("committing group {group}'s offsets in {}", args.topic))?;
    eprintln!("committed group {group} in {}: next offsets {positions:?}", args.topic);
    Ok(())
}

/// What queue mode does with each delivery.
enum Action {
    Ack,
    Nack(String),
    Term(String),
    Exec(String),
}

/// Queue mode: lease, print, settle; close (nacking what was fetched but not printed)
/// on exit.
pub async fn queue(args: ConsumeArgs, connect: Connect, start: StartAt, json: bool) -> anyhow::Result<()> {
    let group = args.group.clone().expect("checked by the caller");
    let start = match start {
        StartAt::Earliest => QueueStart::Earliest,
        StartAt::Latest => QueueStart::Latest,
        other => anyhow::bail!("--from {other:?}: a queue group starts at earliest or latest (it keeps its own place after that)"),
    };
    let action = match (&args.exec, args.nack_all, args.term_all) {
        (Some(cmd), _, _) => Action::Exec(cmd.clone()),
        (None, true, _) => Action::Nack(args.reason.clone().unwrap_or_default()),
        (None, _, true) => Action::Term(args.reason.clone().unwrap_or_default()),
        _ => Action::Ack,
    };
    // Never lease more than --max asks for: what is leased and not printed is handed
    // back (as a nack, which counts as a delivery, as a close does).
    let credit = args.max.map_or(args.max_in_flight, |max| args.max_in_flight.min(max.clamp(1, u64::from(u32::MAX)) as u32));
    let config = QueueConfig { member: args.member.clone(), max_in_flight: credit, start, ..QueueConfig::default() };
    let mut consumer = QueueConsumer::new(connect.cluster()?, &args.topic, &group, config).await?;
    let mut count = 0u64;
    let mut last_message = Instant::now();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let result: anyhow::Result<()> = async {
        'outer: loop {
            let deliveries = tokio::select! {
                d = consumer.poll(POLL_WAIT) => d?,
                _ = &mut interrupted => break,
            };
            if deliveries.is_empty() {
                if args.idle_timeout.is_some_and(|t| last_message.elapsed() >= t) {
                    break;
                }
                continue;
            }
            last_message = Instant::now();
            let take = args.max.map_or(deliveries.len(), |max| deliveries.len().min((max - count) as usize));
            let (now, rest) = deliveries.split_at(take);
            let outcomes = settle_all(now, &action).await;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for (d, outcome) in now.iter().zip(outcomes) {
                let outcome = outcome?;
                let mut extra = serde_json::Map::new();
                extra.insert("attempt".into(), d.attempt.into());
                extra.insert("settled".into(), serde_json::to_value(outcome_name(&outcome)).expect("a string"));
                print_message(&mut out, &d.message, json, extra)?;
            }
            out.flush()?;
            count += take as u64;
            // `rest` (past --max) goes back now rather than when its leases run out.
            futures::future::join_all(rest.iter().map(|d| d.nack(Some(Duration::ZERO), "not processed: keel consume stopped at --max", "closed"))).await;
            if args.max.is_some_and(|max| count >= max) {
                break 'outer;
            }
        }
        Ok(())
    }
    .await;
    consumer.close().await;
    result
}

/// Settles every delivery of a poll by `action` (concurrently: the client batches the
/// verbs into one request per partition).
async fn settle_all(deliveries: &[Delivery], action: &Action) -> Vec<anyhow::Result<SettleOutcome>> {
    match action {
        Action::Exec(cmd) => {
            let mut out = Vec::with_capacity(deliveries.len());
            for d in deliveries {
                out.push(exec_one(d, cmd).await);
            }
            out
        }
        _ => {
            futures::future::join_all(deliveries.iter().map(|d| async move {
                let r = match action {
                    Action::Ack => d.ack().await,
                    Action::Nack(reason) => d.nack(None, reason, "drill").await,
                    Action::Term(reason) => d.term(reason, "drill").await,
                    Action::Exec(_) => unreachable!("handled above"),
                };
                r.map_err(anyhow::Error::from)
            }))
            .await
        }
    }
}

/// Runs `cmd` with the message value on stdin; exit 0 acks, anything else nacks with
/// the tail of its stderr as the reason and `exit-<code>` as the class.
async fn exec_one(d: &Delivery, cmd: &str) -> anyhow::Result<SettleOutcome> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("KEEL_TOPIC_PARTITION", d.message.partition.to_string())
        .env("KEEL_OFFSET", d.message.offset.to_string())
        .env("KEEL_ATTEMPT", d.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting --exec {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input closes the pipe early: not an error.
        let _ = stdin.write_all(d.message.value.as_deref().unwrap_or_default()).await;
    }
    let output = child.wait_with_output().await.with_context(|| format!("waiting for --exec {cmd:?}"))?;
    if output.status.success() {
        return Ok(d.ack().await?);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    let tail = &stderr[stderr.len().saturating_sub(EXEC_REASON_BYTES)..];
    let tail = tail.char_indices().next().map_or("", |_| tail);
    let code = output.status.code().map_or("signal".to_string(), |c| c.to_string());
    let reason = if tail.is_empty() { format!("`{cmd}` exited with {code}") } else { tail.to_string() };
    Ok(d.nack(None, &reason, &format!("exit-{code}")).await?)
}

fn outcome_name(o: &SettleOutcome) -> String {
    match o {
        SettleOutcome::Acked => "acked".into(),
        SettleOutcome::Retrying { attempt, .. } => format!("retrying as attempt {attempt}"),
        SettleOutcome::DeadLettering => "dead-lettered".into(),
        SettleOutcome::Extended { .. } => "extended".into(),
        SettleOutcome::AlreadySettled => "already settled".into(),
        SettleOutcome::NotDelivered => "not delivered".into(),
        SettleOutcome::StaleLease { attempts } => format!("lease lost (now at attempt {attempts})"),
        SettleOutcome::AlreadyDeadLettering => "already dead-lettering".into(),
    }
}
