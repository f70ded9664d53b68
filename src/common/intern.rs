//! Sharing equal values between connections: many clients log in with the same user, database
//! and startup parameters, and each copy would cost every idle client a few allocations.
//!
//! Hand-written (about 40 lines): interning crates keep what they intern forever, while
//! clients choose some of these values (application_name), so this one holds them weakly and
//! forgets a value when its last client leaves.

use std::sync::{Arc, Mutex, Weak};

/// At most this many distinct live values are shared; past that, new ones are not (a client
/// inventing values costs only its own memory).
const MAX_SHARED: usize = 256;

/// A small set of shared values, looked up by equality.
pub struct Interner<T: ?Sized> {
    values: Mutex<Vec<Weak<T>>>,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            values: Mutex::new(Vec::new()),
        }
    }
}

impl<T: ?Sized + PartialEq> Interner<T> {
    /// The shared value equal to `value`, or `value` itself (then shared from now on).
    pub fn share(&self, value: Arc<T>) -> Arc<T> {
        let mut values = self.values.lock().expect("interner lock");
        let mut live = 0;
        let mut found = None;
        values.retain(|w| match w.upgrade() {
            Some(v) => {
                if found.is_none() && *v == *value {
                    found = Some(v);
                }
                live += 1;
                true
            }
            None => false,
        });
        if let Some(v) = found {
            return v;
        }
        if live < MAX_SHARED {
            values.push(Arc::downgrade(&value));
        }
        value
    }
}

impl Interner<str> {
    /// The shared string equal to `s`.
    pub fn share_str(&self, s: &str) -> Arc<str> {
        self.share(Arc::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_shared_while_someone_holds_them() {
        let names = Interner::<str>::default();
        let a = names.share_str("app");
        let b = names.share_str("app");
        assert!(Arc::ptr_eq(&a, &b));
        let c = names.share_str("other");
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        let d = names.share_str("app");
        assert_eq!(&*d, "app");
        assert_eq!(
            names.values.lock().unwrap().len(),
            2,
            "the dead entry was dropped"
        );
    }
}
