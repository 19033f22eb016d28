//! Finding the rows a database refuses, without giving up the rest: one bad input costs one
//! message or one delivery (docs/design.md 9). Pure: the write and the wait are closures, so the
//! splitting is unit-tested without a database.

use std::future::Future;

/// What [`write_in_order`] did: the results of every slice that was written, in item order, and
/// the items refused on their own, with the error each got.
#[derive(Debug)]
pub struct Written<R, E> {
    pub results: Vec<R>,
    pub refused: Vec<(usize, E)>,
}

/// Writes `items` through `write`, slice by slice, in order. A slice that fails with a data error
/// (`is_data`) is split in halves and each half tried again, left first, until the single items
/// that fail by themselves are found: those are refused, everything else is written. Any other
/// error is passed to `wait` (log it, back off) and the same slice is tried again: a database
/// that is away must not turn good items into refused ones. With k bad items among n this costs
/// about 2·k·log2(n) extra calls; a batch without bad items costs one.
pub async fn write_in_order<'a, T, R, E, W, WF, D, S, SF>(
    items: &'a [T],
    mut write: W,
    is_data: D,
    mut wait: S,
) -> Written<R, E>
where
    W: FnMut(&'a [T]) -> WF,
    WF: Future<Output = Result<Vec<R>, E>>,
    D: Fn(&E) -> bool,
    S: FnMut(E) -> SF,
    SF: Future<Output = ()>,
{
    let mut written = Written {
        results: Vec::new(),
        refused: Vec::new(),
    };
    // Ranges still to write, the next one on top.
    let mut pending = vec![(0, items.len())];
    while let Some((start, end)) = pending.pop() {
        if start == end {
            continue;
        }
        loop {
            match write(&items[start..end]).await {
                Ok(results) => {
                    written.results.extend(results);
                    break;
                }
                Err(error) if is_data(&error) => {
                    if end - start == 1 {
                        written.refused.push((start, error));
                    } else {
                        let middle = start + (end - start) / 2;
                        pending.push((middle, end));
                        pending.push((start, middle));
                    }
                    break;
                }
                Err(error) => wait(error).await,
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::cell::RefCell;

    #[derive(Debug, PartialEq)]
    enum Fault {
        Data(u32),
        Away,
    }

    /// A fake table that refuses the values in `bad` (data error) and is away for the first
    /// `away` calls; returns (written in call order, refused, number of calls).
    fn run(items: &[u32], bad: &[u32], away: usize) -> (Vec<u32>, Vec<(usize, Fault)>, usize) {
        let calls = RefCell::new(0);
        let waits = RefCell::new(0);
        let written = block_on(write_in_order(
            items,
            |slice: &[u32]| {
                *calls.borrow_mut() += 1;
                let call = *calls.borrow();
                let result = if call <= away {
                    Err(Fault::Away)
                } else if let Some(b) = slice.iter().find(|v| bad.contains(v)) {
                    Err(Fault::Data(*b))
                } else {
                    Ok(slice.to_vec())
                };
                async move { result }
            },
            |e| matches!(e, Fault::Data(_)),
            |e| {
                assert_eq!(e, Fault::Away);
                *waits.borrow_mut() += 1;
                async {}
            },
        ));
        assert_eq!(*waits.borrow(), away);
        (written.results, written.refused, calls.into_inner())
    }

    #[test]
    fn a_clean_batch_is_one_call() {
        let (written, refused, calls) = run(&[1, 2, 3, 4], &[], 0);
        assert_eq!(written, vec![1, 2, 3, 4]);
        assert!(refused.is_empty());
        assert_eq!(calls, 1);
    }

    #[test]
    fn bad_items_are_isolated_and_the_rest_is_written_in_order() {
        let items: Vec<u32> = (0..13).collect();
        let (written, refused, _) = run(&items, &[0, 5, 6, 12], 0);
        assert_eq!(written, vec![1, 2, 3, 4, 7, 8, 9, 10, 11]);
        assert_eq!(
            refused,
            vec![
                (0, Fault::Data(0)),
                (5, Fault::Data(5)),
                (6, Fault::Data(6)),
                (12, Fault::Data(12))
            ]
        );
    }

    #[test]
    fn every_item_bad_refuses_every_item() {
        let (written, refused, _) = run(&[7, 8, 9], &[7, 8, 9], 0);
        assert!(written.is_empty());
        assert_eq!(refused.len(), 3);
    }

    #[test]
    fn one_bad_item_costs_about_two_log_n_calls() {
        let items: Vec<u32> = (0..512).collect();
        let (written, refused, calls) = run(&items, &[300], 0);
        assert_eq!(written.len(), 511);
        assert_eq!(refused, vec![(300, Fault::Data(300))]);
        assert!(calls <= 2 * 9 + 1, "{calls} calls");
    }

    #[test]
    fn other_errors_wait_and_retry_the_same_slice_without_refusing_anything() {
        let (written, refused, calls) = run(&[1, 2, 3], &[2], 3);
        assert_eq!(written, vec![1, 3]);
        assert_eq!(refused, vec![(1, Fault::Data(2))]);
        assert!(calls >= 4);
    }

    #[test]
    fn an_empty_batch_makes_no_call() {
        let (written, refused, calls) = run(&[], &[], 0);
        assert!(written.is_empty() && refused.is_empty());
        assert_eq!(calls, 0);
    }
}
