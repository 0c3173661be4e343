//! A single-threaded broadcast event: tasks wait, `notify` wakes every waiter.
//!
//! Waiters check their condition, then await [`Event::listen`]; because a shard runs one task
//! at a time and `listen` captures the generation when it is created, a notify between the
//! check and the first poll is never missed.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct Event {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Event {
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn listen(&self) -> Listen<'_> {
        Listen { event: self, generation: self.generation.get() }
    }
}

pub(crate) struct Listen<'a> {
    event: &'a Event,
    generation: u64,
}

impl Future for Listen<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        self.event.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
