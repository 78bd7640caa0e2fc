//! What a driver refused to free (a ring's slabs, a stream, an event), kept on a shelf
//! and retried by the next release instead of being leaked or freed twice.

use crate::error::{Error, Result};

/// Resources whose freeing was refused, to be retried.
pub(crate) struct Shelf<T>(Vec<T>);

impl<T> Default for Shelf<T> {
    fn default() -> Self {
        Shelf(Vec::new())
    }
}

impl<T> Shelf<T> {
    pub(crate) fn push(&mut self, t: T) {
        self.0.push(t);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Tries `free` on each again; keeps the ones refused again and records the first
    /// error in `first`.
    pub(crate) fn retry(
        &mut self,
        first: &mut Option<Error>,
        mut free: impl FnMut(&mut T) -> Result<()>,
    ) {
        for mut t in std::mem::take(&mut self.0) {
            if let Err(e) = free(&mut t) {
                first.get_or_insert(e);
                self.0.push(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_items_stay_and_the_first_error_is_kept() {
        let mut shelf = Shelf::default();
        for i in 0..4 {
            shelf.push(i);
        }
        let mut first = None;
        shelf.retry(&mut first, |&mut i| match i % 2 {
            0 => Ok(()),
            _ => Err(Error::Internal(format!("refused {i}"))),
        });
        assert_eq!(shelf.0, vec![1, 3]);
        assert!(first.unwrap().to_string().contains("refused 1"));
        let mut first = None;
        shelf.retry(&mut first, |_| Ok(()));
        assert!(shelf.is_empty() && first.is_none());
    }
}
