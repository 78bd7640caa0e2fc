//! Checking out a sink's staging resources: one process-wide set per sink, used by one
//! copy at a time. The lock is held only to take or give them back, never while a copy
//! runs or a progress callback (which may need Python's GIL) is called; a thread that
//! already holds the set is refused instead of waiting for itself forever.

use std::cell::RefCell;
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};

/// What a checked-out set does when the copy that held it panicked: let its queued work
/// finish before anyone else touches the slabs (CUDA: synchronise the streams).
pub(crate) trait Settle {
    fn settle_after_panic(&mut self);
}

/// The process-wide slot of one sink's staging resources `T` (created on first checkout
/// with `T::default()`, kept for the process).
pub(crate) struct Checkout<T: 'static> {
    slot: Mutex<Slot<T>>,
    free: Condvar,
}

struct Slot<T> {
    value: Option<Box<T>>,
    busy: bool,
}

thread_local! {
    /// The checkouts this thread holds (their addresses).
    static HOLDING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

impl<T: Default + Settle + Send + 'static> Checkout<T> {
    pub(crate) const fn new() -> Checkout<T> {
        Checkout {
            slot: Mutex::new(Slot {
                value: None,
                busy: false,
            }),
            free: Condvar::new(),
        }
    }

    fn key(&'static self) -> usize {
        self as *const Self as usize
    }

    /// Waits until no other copy holds the resources and takes them. On a thread that
    /// already holds them, returns `nested()` instead.
    pub(crate) fn take(&'static self, nested: impl FnOnce() -> Error) -> Result<Guard<T>> {
        if HOLDING.with(|h| h.borrow().contains(&self.key())) {
            return Err(nested());
        }
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        while slot.busy {
            slot = self.free.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
        slot.busy = true;
        let value = slot.value.take().unwrap_or_default();
        drop(slot);
        HOLDING.with(|h| h.borrow_mut().push(self.key()));
        Ok(Guard {
            owner: self,
            value: Some(value),
        })
    }
}

/// The resources, checked out: given back (and the next waiter woken) on drop.
pub(crate) struct Guard<T: Default + Settle + Send + 'static> {
    owner: &'static Checkout<T>,
    value: Option<Box<T>>,
}

impl<T: Default + Settle + Send + 'static> std::ops::Deref for Guard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("checked out")
    }
}

impl<T: Default + Settle + Send + 'static> std::ops::DerefMut for Guard<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("checked out")
    }
}

impl<T: Default + Settle + Send + 'static> Drop for Guard<T> {
    fn drop(&mut self) {
        let mut value = self.value.take();
        if std::thread::panicking() {
            if let Some(v) = value.as_mut() {
                v.settle_after_panic();
            }
        }
        let mut slot = self.owner.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.value = value;
        slot.busy = false;
        drop(slot);
        let key = self.owner.key();
        HOLDING.with(|h| h.borrow_mut().retain(|&k| k != key));
        self.owner.free.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Res(u32);

    impl Settle for Res {
        fn settle_after_panic(&mut self) {}
    }

    static RES: Checkout<Res> = Checkout::new();

    #[test]
    fn one_holder_at_a_time_and_no_nested_checkout() {
        let mut g = RES.take(|| Error::Internal("nested".into())).unwrap();
        g.0 += 1;
        let e = RES
            .take(|| Error::Internal("nested".into()))
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("nested"));
        let other = std::thread::spawn(|| {
            let mut g = RES.take(|| Error::Internal("nested".into())).unwrap();
            g.0 += 10;
            g.0
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !other.is_finished(),
            "waits while the resources are checked out"
        );
        drop(g);
        assert_eq!(other.join().unwrap(), 11, "the same resources, given back");
    }
}
