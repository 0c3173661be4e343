//! A single-threaded broadcast event: tasks wait, `notify` wakes every waiter.
//!
//! Waiters check their condition, then await [`Event::listen`]; because a shard runs one task
//! at a time and `listen` captures the generation when it is created, a notify between the
//! check and the first poll is never missed.
//!
//! A waiter holds one slot however often it is polled, and gives it up when dropped (both in
//! constant time): a `Listen` raced against a timer (a long-poll, a sweeper) and dropped
//! leaves nothing behind.
//! (Every poll used to add a waker clone that only the next notify removed: an idle event
//! kept them all, each holding its task alive, until glommio's 16-bit task reference count
//! overflowed and the shard panicked.)

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct Event {
    generation: Cell<u64>,
    /// The wakers of this generation's waiting `Listen`s, by slot; `None`: a free slot.
    wakers: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl Event {
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        self.free.borrow_mut().clear();
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    pub fn listen(&self) -> Listen<'_> {
        Listen { event: self, generation: self.generation.get(), slot: None }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.wakers.borrow().iter().flatten().count()
    }
}

pub(crate) struct Listen<'a> {
    event: &'a Event,
    generation: u64,
    /// Where this waiter's waker is kept, once it has been polled (valid in its generation
    /// only: a notify empties the slots).
    slot: Option<usize>,
}

impl Future for Listen<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = self.event.wakers.borrow_mut();
        match self.slot {
            Some(slot) => match &mut wakers[slot] {
                Some(waker) => waker.clone_from(cx.waker()),
                empty => *empty = Some(cx.waker().clone()),
            },
            None => {
                let slot = match self.event.free.borrow_mut().pop() {
                    Some(slot) => {
                        wakers[slot] = Some(cx.waker().clone());
                        slot
                    }
                    None => {
                        wakers.push(Some(cx.waker().clone()));
                        wakers.len() - 1
                    }
                };
                drop(wakers);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Listen<'_> {
    fn drop(&mut self) {
        // After a notify the slot is gone already (the next generation's slots are others').
        let Some(slot) = self.slot else { return };
        if self.event.generation.get() != self.generation {
            return;
        }
        if let (Ok(mut wakers), Ok(mut free)) =
            (self.event.wakers.try_borrow_mut(), self.event.free.try_borrow_mut())
        {
            wakers[slot] = None;
            free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiter_polled_many_times_holds_one_slot_and_frees_it_when_dropped() {
        let event = Event::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        {
            let mut listen = std::pin::pin!(event.listen());
            for _ in 0..1000 {
                assert!(listen.as_mut().poll(&mut cx).is_pending());
            }
            assert_eq!(event.waiting(), 1);
            // Held until dropped (the waker is the task, kept alive by the clone).
            assert_eq!(Arc::strong_count(&count), 3);
        }
        assert_eq!(event.waiting(), 0, "a dropped waiter leaves nothing behind");
        assert_eq!(Arc::strong_count(&count), 2);
    }

    #[test]
    fn slots_freed_by_dropped_waiters_are_reused_within_a_generation_only() {
        let event = Event::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut kept = Box::pin(event.listen());
        assert!(kept.as_mut().poll(&mut cx).is_pending());
        for _ in 0..100 {
            let mut passing = Box::pin(event.listen());
            assert!(passing.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(event.waiting(), 1);
        assert_eq!(event.wakers.borrow().len(), 2, "the freed slot is reused");
        event.notify();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "only the waiter still there is woken");
        // A waiter of the new generation takes slot 0; dropping the old one must not free it.
        let mut fresh = Box::pin(event.listen());
        assert!(fresh.as_mut().poll(&mut cx).is_pending());
        drop(kept);
        assert_eq!(event.waiting(), 1, "the old generation's drop left the new waiter alone");
        event.notify();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn notify_wakes_every_waiter_once_and_they_finish() {
        let event = Event::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut first = Box::pin(event.listen());
        let mut second = Box::pin(event.listen());
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        // A listen created before the notify but first polled after it is not lost.
        let mut late = Box::pin(event.listen());
        event.notify();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(first.as_mut().poll(&mut cx).is_ready());
        assert!(second.as_mut().poll(&mut cx).is_ready());
        assert!(late.as_mut().poll(&mut cx).is_ready());
        drop((first, second, late));
        assert_eq!(event.waiting(), 0);
    }
}
