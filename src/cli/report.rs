//! `webhook-delivery report ...`: incident reports from the ledger.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::table::{one_line, or_dash, timestamp, Table};
use super::{emit, CliError, ReportCommand, ReportFormat};
use crate::config::RetentionSettings;
use crate::ledger::{DeliveryStory, DuplicateDelivery, EventStory, Ledger};

pub async fn report(
    ledger: &Ledger,
    retention: &RetentionSettings,
    command: ReportCommand,
) -> Result<(), CliError> {
    // stderr: stdout stays pure CSV/JSON for the file.
    eprintln!("note: {}", crate::retention::kept_note(retention));
    match command {
        ReportCommand::Duplicates {
            since,
            until,
            format,
        } => {
            let until = until.unwrap_or_else(Utc::now);
            if until <= since {
                return Err(CliError::EmptyWindow { since, until });
            }
            if retention.enabled && since < Utc::now() - retention.delivered() {
                eprintln!(
                    "note: --since {} is older than the {} the ledger keeps delivered deliveries: \
                     duplicates delivered before then are no longer counted",
                    timestamp(since),
                    crate::retention::human(retention.delivered())
                );
            }
            let duplicates = ledger.duplicate_deliveries(since, until).await?;
            let summary = summarize(&duplicates);
            let extra: i64 = summary.iter().map(|s| s.extra_deliveries).sum();
            // For the person running it; stdout stays pure CSV/JSON for the file.
            eprintln!(
                "{} webhook-ids were delivered more than once ({extra} extra deliveries) to {} brokers, \
                 counting 2xx answers to attempts started in [{}, {})",
                duplicates.len(),
                summary.len(),
                timestamp(since),
                timestamp(until)
            );
            let text = match format {
                ReportFormat::Csv => duplicates_csv(since, until, &duplicates, &summary),
                ReportFormat::Json => {
                    let report = DuplicatesReport {
                        since,
                        until,
                        duplicates: &duplicates,
                        summary: &summary,
                    };
                    serde_json::to_string_pretty(&report).expect("report serializes") + "\n"
                }
            };
            emit(&text)
        }
        ReportCommand::Deliveries { event_id, json } => {
            let Some(story) = ledger.event_story(&event_id).await? else {
                return Err(CliError::UnknownEvent(
                    event_id,
                    crate::retention::kept_note(retention),
                ));
            };
            let text = if json {
                serde_json::to_string_pretty(&story).expect("story serializes") + "\n"
            } else {
                render_story(&story)
            };
            emit(&text)
        }
    }
}

#[derive(Serialize)]
struct DuplicatesReport<'a> {
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    duplicates: &'a [DuplicateDelivery],
    summary: &'a [DuplicateSummary],
}

#[derive(Debug, PartialEq, Serialize)]
struct DuplicateSummary {
    broker_id: String,
    duplicated_webhook_ids: i64,
    /// Deliveries beyond the first, i.e. the webhooks the broker should not have received.
    extra_deliveries: i64,
}

fn summarize(duplicates: &[DuplicateDelivery]) -> Vec<DuplicateSummary> {
    let mut by_broker: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for d in duplicates {
        let entry = by_broker.entry(&d.broker_id).or_default();
        entry.0 += 1;
        entry.1 += d.times_delivered - 1;
    }
    by_broker
        .into_iter()
        .map(|(broker_id, (ids, extra))| DuplicateSummary {
            broker_id: broker_id.to_owned(),
            duplicated_webhook_ids: ids,
            extra_deliveries: extra,
        })
        .collect()
}

/// Two sections, each with its own header, separated by a blank line. The window is repeated
/// in the summary so the file explains itself when forwarded on its own.
fn duplicates_csv(
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    duplicates: &[DuplicateDelivery],
    summary: &[DuplicateSummary],
) -> String {
    let mut out = String::from(
        "broker_id,webhook_id,event_id,load_id,times_delivered,first_delivered_at,last_delivered_at\n",
    );
    for d in duplicates {
        csv_line(
            &mut out,
            &[
                &d.broker_id,
                &d.webhook_id,
                d.event_id.as_deref().unwrap_or(""),
                &d.load_id,
                &d.times_delivered.to_string(),
                &timestamp(d.first_delivered_at),
                &timestamp(d.last_delivered_at),
            ],
        );
    }
    out.push('\n');
    out.push_str("broker_id,duplicated_webhook_ids,extra_deliveries,window_since,window_until\n");
    for s in summary {
        csv_line(
            &mut out,
            &[
                &s.broker_id,
                &s.duplicated_webhook_ids.to_string(),
                &s.extra_deliveries.to_string(),
                &timestamp(since),
                &timestamp(until),
            ],
        );
    }
    out
}

fn csv_line(out: &mut String, fields: &[&str]) {
    let escaped: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&escaped.join(","));
    out.push('\n');
}

/// RFC 4180: quote a field that holds a comma, quote or line break; double inner quotes.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

fn render_story(story: &EventStory) -> String {
    let mut out = format!(
        "event {} (idempotency key {}), load {}, status {}\n\
         consumed from {} partition {} offset {} at {}\n",
        story.event_id.as_deref().unwrap_or("without eventId"),
        story.idempotency_key,
        story.load_id,
        story.status,
        story.topic,
        story.partition,
        story.offset,
        timestamp(story.consumed_at),
    );
    if story.deliveries.is_empty() {
        out.push_str(
            "\nno deliveries: no enabled broker was subscribed to this load when the event was consumed \
             (`webhook-delivery backfill` creates a broker's missed deliveries)\n",
        );
    }
    for delivery in &story.deliveries {
        out.push('\n');
        out.push_str(&render_delivery(delivery));
    }
    out
}

fn render_delivery(delivery: &DeliveryStory) -> String {
    let state = match delivery.state.as_str() {
        "delivered" => format!(
            "delivered at {}",
            or_dash(delivery.delivered_at.map(timestamp))
        ),
        "dead" => format!(
            "dead: {}",
            delivery
                .dead_reason
                .as_deref()
                .unwrap_or("no reason recorded")
        ),
        "pending" => format!(
            "pending, next attempt at {}",
            or_dash(delivery.next_attempt_at.map(timestamp))
        ),
        other => other.to_owned(),
    };
    let mut table = Table::new(&[
        ("attempt", true),
        ("started_at", false),
        ("latency_ms", true),
        ("result", false),
        ("outcome", false),
    ]);
    for a in &delivery.attempts {
        // An HTTP failure's message already starts with "HTTP <code>" and adds the body excerpt.
        let result = match (a.status_code, &a.error_message) {
            (Some(_), Some(message)) => message.clone(),
            (Some(code), None) => format!("HTTP {code}"),
            (None, message) => format!(
                "{}: {}",
                a.error_class.as_deref().unwrap_or("error"),
                message.as_deref().unwrap_or("-")
            ),
        };
        table.row(vec![
            a.attempt.to_string(),
            timestamp(a.started_at),
            a.latency_ms.to_string(),
            one_line(&result, 100),
            a.outcome.clone(),
        ]);
    }
    let attempts = if delivery.attempts.is_empty() {
        "  no attempts yet\n".to_owned()
    } else {
        table
            .render()
            .lines()
            .map(|line| format!("  {line}\n"))
            .collect()
    };
    format!(
        "broker {} (delivery {}, webhook-id {}): {state}\n{attempts}",
        delivery.broker_id, delivery.delivery_id, delivery.webhook_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(broker: &str, id: &str, times: i64) -> DuplicateDelivery {
        let at = "2026-11-25T02:00:00Z".parse().unwrap();
        DuplicateDelivery {
            broker_id: broker.into(),
            webhook_id: id.into(),
            event_id: Some("e,1".into()),
            load_id: "L1".into(),
            times_delivered: times,
            first_delivered_at: at,
            last_delivered_at: at,
        }
    }

    #[test]
    fn the_summary_counts_ids_and_extra_deliveries_per_broker() {
        let rows = [
            duplicate("b2", "msg_a", 2),
            duplicate("b1", "msg_b", 3),
            duplicate("b1", "msg_c", 2),
        ];
        assert_eq!(
            summarize(&rows),
            vec![
                DuplicateSummary {
                    broker_id: "b1".into(),
                    duplicated_webhook_ids: 2,
                    extra_deliveries: 3
                },
                DuplicateSummary {
                    broker_id: "b2".into(),
                    duplicated_webhook_ids: 1,
                    extra_deliveries: 1
                },
            ]
        );
    }

    #[test]
    fn csv_has_two_sections_and_quotes_what_needs_it() {
        let since = "2026-11-25T00:00:00Z".parse().unwrap();
        let until = "2026-11-26T00:00:00Z".parse().unwrap();
        let rows = [duplicate("b1", "msg_a", 2)];
        let csv = duplicates_csv(since, until, &rows, &summarize(&rows));
        assert_eq!(
            csv,
            "broker_id,webhook_id,event_id,load_id,times_delivered,first_delivered_at,last_delivered_at\n\
             b1,msg_a,\"e,1\",L1,2,2026-11-25T02:00:00.000Z,2026-11-25T02:00:00.000Z\n\
             \n\
             broker_id,duplicated_webhook_ids,extra_deliveries,window_since,window_until\n\
             b1,1,1,2026-11-25T00:00:00.000Z,2026-11-26T00:00:00.000Z\n"
        );
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
