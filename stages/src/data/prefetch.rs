//! Training batches drawn on a thread of their own while the model
//! computes: a shard's read and the rows' copies leave the step's path.
//! The batches, their order and the cursor a checkpoint saves are the
//! stream's own ([`BatchStream`]), so artifacts and resumes are unchanged.

use std::sync::mpsc::{Receiver, sync_channel};

use super::level_table::{BatchStream, Cursor, Rows};
use crate::error::{Error, Result};

/// Batches kept ready ahead of the one being computed.
const AHEAD: usize = 2;

/// A batch, its companion rows, and where the stream stands after it.
type Drawn = Result<(Rows, Option<Rows>, Cursor)>;

/// A [`BatchStream`] read `batch` rows at a time, ahead of the caller
/// from the first batch asked for on.
pub struct Prefetched {
    batch: usize,
    state: State,
}

enum State {
    /// Nothing asked for yet: a resume may still move the stream.
    Idle(Box<BatchStream>),
    /// The thread draws; `cursor` is where the batches handed out end.
    Running {
        batches: Receiver<Drawn>,
        cursor: Cursor,
    },
    /// The thread could not be started (said once; the cursor kept).
    Failed(Cursor),
}

impl Prefetched {
    pub fn new(stream: BatchStream, batch: usize) -> Self {
        Prefetched {
            batch,
            state: State::Idle(Box::new(stream)),
        }
    }

    /// Where the batches handed out so far leave the stream: what a
    /// checkpoint saves.
    pub fn cursor(&self) -> Cursor {
        match &self.state {
            State::Idle(stream) => stream.cursor,
            State::Running { cursor, .. } | State::Failed(cursor) => *cursor,
        }
    }

    /// Moves the stream to `cursor` (a resume from a checkpoint); only
    /// before the first batch.
    pub fn seek(&mut self, cursor: Cursor) -> Result<()> {
        match &mut self.state {
            State::Idle(stream) => {
                stream.cursor = cursor;
                Ok(())
            }
            State::Running { .. } | State::Failed(_) => Err(Error::Params(
                "internal: the batch stream moved after its first batch".into(),
            )),
        }
    }

    /// The next batch and its companion rows (see [`BatchStream::next_pair`]).
    pub fn next_pair(&mut self) -> Result<(Rows, Option<Rows>)> {
        if matches!(self.state, State::Idle(_)) {
            let cursor = self.cursor();
            let State::Idle(stream) = std::mem::replace(&mut self.state, State::Failed(cursor))
            else {
                unreachable!("idle just above")
            };
            self.state = start(*stream, self.batch)?;
        }
        let State::Running { batches, cursor } = &mut self.state else {
            return Err(Error::Params(
                "the thread drawing training batches did not start; run the stage again".into(),
            ));
        };
        match batches.recv() {
            Ok(drawn) => {
                let (rows, companion, after) = drawn?;
                *cursor = after;
                Ok((rows, companion))
            }
            // The thread ends only after sending its error, or on a panic.
            Err(_) => Err(Error::Params(
                "the thread drawing training batches stopped; run the stage again".into(),
            )),
        }
    }
}

/// Draws `batch`-row batches from `stream` on a new thread, `AHEAD` ahead.
fn start(mut stream: BatchStream, batch: usize) -> Result<State> {
    let cursor = stream.cursor;
    let (send, batches) = sync_channel::<Drawn>(AHEAD);
    std::thread::Builder::new()
        .name("haic-batches".into())
        .spawn(move || {
            loop {
                let drawn = stream
                    .next_pair(batch)
                    .map(|(rows, companion)| (rows, companion, stream.cursor));
                let failed = drawn.is_err();
                // The receiver gone (the stage ended) stops the thread.
                if send.send(drawn).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("starting the thread that draws training batches", e))?;
    Ok(State::Running { batches, cursor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::level_table::tests::{code_table, code_table_of};

    #[test]
    fn the_same_batches_and_cursors_as_the_stream_and_a_resume_moves_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let target = code_table(a.path(), 10, 4);
        let companion = code_table_of(b.path(), (0..10).map(|i| (i, [2 * i as u16, 7])), 3);
        let paired = || BatchStream::paired(&target, &companion, "train", 3, Cursor::default());
        for batch in [3, 4, 7] {
            let mut plain = paired().unwrap();
            let mut ahead = Prefetched::new(paired().unwrap(), batch);
            // Across shards and epochs (10 rows in shards of 4).
            for _ in 0..12 {
                assert_eq!(ahead.next_pair().unwrap(), plain.next_pair(batch).unwrap());
                assert_eq!(ahead.cursor(), plain.cursor, "batch {batch}");
            }
            assert!(
                ahead.seek(Cursor::default()).is_err(),
                "no seek once running"
            );
        }
        // A resume: seek to a saved cursor, then the stream from there.
        let mut plain = paired().unwrap();
        plain.next_pair(5).unwrap();
        let saved = plain.cursor;
        let mut ahead = Prefetched::new(paired().unwrap(), 5);
        ahead.seek(saved).unwrap();
        assert_eq!(ahead.cursor(), saved);
        for _ in 0..4 {
            assert_eq!(ahead.next_pair().unwrap(), plain.next_pair(5).unwrap());
        }
    }

    #[test]
    fn a_read_error_reaches_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let t = code_table(dir.path(), 10, 4);
        let mut ahead = Prefetched::new(
            BatchStream::new(&t, "train", 3, Cursor::default()).unwrap(),
            4,
        );
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "parquet") {
                std::fs::write(&path, b"not parquet").unwrap();
            }
        }
        let err = ahead.next_pair().unwrap_err().to_string();
        assert!(err.contains(".parquet"), "{err}");
        assert!(ahead.next_pair().is_err(), "and it stays an error");
    }
}
